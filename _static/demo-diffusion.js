// 第 8 章「ブラウザーで生成する」: 同梱の UNet (ONNX) で DDIM サンプリングをブラウザーの中で行います。
//
// サンプラーは code/torchbook/diffusion/sampling.py の guided_eps と ddim_step を 1 行ずつ
// 写したもので、変数名も Python と同じにしています。ᾱ_t、DDIM の時刻、クラス名は
// ビルドが書き出した diffusion.json から読みます (ここには数値を書き写しません)。
// ランタイムとモデルは「生成」を押したときに初めて読みます (webdemo-loader.js)。
(() => {
  "use strict";

  const demo = window.torchbookDemo;
  const MODEL = "diffusion-unet.onnx";
  const META = "diffusion.json";
  const TESTS = "diffusion-tests.json";

  // ---------------------------------------------------------------- シードつきの乱数

  // mulberry32: 32 ビットの状態を持つ小さな一様乱数。同じシードなら同じ列になります
  // (torch の乱数とは別の列です。CI の照合には、ビルドが書き出した x_T を使います)。
  function mulberry32(seed) {
    let a = seed >>> 0;
    return () => {
      a = (a + 0x6d2b79f5) >>> 0;
      let r = Math.imul(a ^ (a >>> 15), a | 1);
      r ^= r + Math.imul(r ^ (r >>> 7), r | 61);
      return ((r ^ (r >>> 14)) >>> 0) / 4294967296;
    };
  }

  // 標準正規分布の乱数 n 個 (ボックス=ミュラー法)。rand は [0, 1) の一様乱数
  function randn(rand, n) {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i += 2) {
      const u = 1 - rand(); // (0, 1]: log(0) を避ける
      const v = rand();
      const r = Math.sqrt(-2 * Math.log(u));
      out[i] = r * Math.cos(2 * Math.PI * v);
      if (i + 1 < n) out[i + 1] = r * Math.sin(2 * Math.PI * v);
    }
    return out;
  }

  // ---------------------------------------------------------------- sampling.py と同じ手順

  // torch.cat([a, b]) に当たる連結 (Float32Array どうし、または数の配列どうし)
  function cat(a, b) {
    if (Array.isArray(a)) return a.concat(b);
    const out = new a.constructor(a.length + b.length);
    out.set(a);
    out.set(b, a.length);
    return out;
  }

  // [guided_eps]
  // classifier-free guidance 付きの ε の予測: ε̂ = ε_u + s · (ε_c - ε_u)
  async function guided_eps(model, x, t, y, guidance_scale) {
    if (y === null || guidance_scale === 0) {
      return model(x, t, null);
    }
    if (guidance_scale === 1) {
      return model(x, t, y);
    }
    const nul = y.map(() => model.null_class); // torch.full_like(y, model.null_class)
    const out = await model(cat(x, x), cat(t, t), cat(y, nul));
    const eps_c = out.subarray(0, x.length); // out.chunk(2)
    const eps_u = out.subarray(x.length);
    return eps_u.map((u, i) => u + guidance_scale * (eps_c[i] - u));
  }
  // [/guided_eps]

  // [ddim_step]
  // DDIM の 1 ステップ: 時刻 t から t_prev (< t、-1 なら x_0) へ跳ぶ。
  // Python は x_prev だけを返しますが、画面に x̂_0 も描くので両方を返します。
  function ddim_step(sched, eps, t, t_prev, x_t, eta = 0, noise = null, clip = true) {
    const ac = sched.alphas_cumprod[t];
    const ac_prev = t_prev >= 0 ? sched.alphas_cumprod[t_prev] : 1.0;
    let x0 = x_t.map((x, i) => (x - (1 - ac) ** 0.5 * eps[i]) / ac ** 0.5);
    if (clip) {
      x0 = x0.map((v) => Math.min(Math.max(v, -1), 1)); // x0.clamp(-1, 1)
      eps = x_t.map((x, i) => (x - ac ** 0.5 * x0[i]) / (1 - ac) ** 0.5);
    }
    const variance = (1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev); // Python の var
    const std = eta * variance ** 0.5;
    let x_prev = x0.map((v, i) => ac_prev ** 0.5 * v + (1 - ac_prev - std ** 2) ** 0.5 * eps[i]);
    if (eta > 0 && t_prev >= 0) {
      x_prev = x_prev.map((v, i) => v + std * noise[i]);
    }
    return { x_prev, x0 };
  }
  // [/ddim_step]

  // [sample]
  // sample(method="ddim") のループ: 時刻は Python の ddim_timesteps が書き出した列を使う
  async function sample(model, sched, { y, guidance_scale, steps, eta, x_T, rand, onStep }) {
    const times = sched.timesteps[String(steps)];
    let x = x_T;
    for (let i = 0; i < times.length; i++) {
      const t = times[i];
      const eps = await guided_eps(model, x, [t], y, guidance_scale);
      const t_prev = i + 1 < times.length ? times[i + 1] : -1;
      const noise = eta > 0 ? randn(rand, x.length) : null;
      const { x_prev, x0 } = ddim_step(sched, eps, t, t_prev, x, eta, noise);
      x = x_prev;
      if (onStep) await onStep(i, t, x, x0);
    }
    return x.map((v) => Math.min(Math.max(v, -1), 1)); // x.clamp(-1, 1)
  }
  // [/sample]

  // ---------------------------------------------------------------- モデルの読み込み

  // ONNX のセッションを、Python の model(x, t, y) と同じ形で呼べる関数にする
  function wrap(ort, session, meta) {
    const [C, H, W] = meta.shape;
    const [xName, tName, yName] = meta.inputs;
    const model = async (x, t, y) => {
      const n = t.length;
      const labels = y === null ? t.map(() => meta.null_class) : y; // y=None はクラスなし
      const feeds = {
        [xName]: new ort.Tensor("float32", x, [n, C, H, W]),
        [tName]: new ort.Tensor("int64", BigInt64Array.from(t, BigInt), [n]),
        [yName]: new ort.Tensor("int64", BigInt64Array.from(labels, BigInt), [n]),
      };
      const out = await session.run(feeds);
      return out[meta.outputs[0]].data; // Float32Array (n·C·H·W)
    };
    model.null_class = meta.null_class;
    return model;
  }

  let loaded = null;

  // ランタイム・モデル・メタデータを 1 度だけ読む (2 回目からは同じものを返す)
  function load(onProgress) {
    if (!loaded) {
      loaded = (async () => {
        const ort = await demo.loadRuntime(onProgress);
        const meta = await demo.fetchJSON(demo.url(META), onProgress);
        const session = await demo.loadModel(demo.url(MODEL), onProgress);
        return { model: wrap(ort, session, meta), sched: meta };
      })();
      loaded.catch(() => { loaded = null; }); // 失敗したら次に押したときにやり直す
    }
    return loaded;
  }

  // ---------------------------------------------------------------- 画面

  // [-1, 1] の画像 (C·H·W) をキャンバスに描く (範囲の外は黒か白に切り詰める)
  function draw(canvas, x, [, H, W]) {
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(W, H);
    for (let i = 0; i < H * W; i++) {
      const v = Math.round((Math.min(Math.max(x[i], -1), 1) + 1) * 127.5);
      img.data.set([v, v, v, 255], 4 * i);
    }
    ctx.putImageData(img, 0, 0);
  }

  function setup(root) {
    if (demo.fileNotice(root)) return;
    const form = root.querySelector("form");
    const button = form.querySelector("button");
    const status = root.querySelector("[role=status]");
    const [canvasX, canvasX0] = root.querySelectorAll("canvas");
    const className = () => form.label.options[form.label.selectedIndex].text;

    // スライダーの値をその隣の <output> に表示する
    for (const input of form.querySelectorAll("input[type=range]")) {
      const out = form.querySelector(`output[for=${input.id}]`);
      const show = () => { out.textContent = input.value; };
      input.addEventListener("input", show);
      show();
    }

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const y = [Number(form.label.value)];
      const guidance_scale = Number(form.guidance.value);
      const steps = Number(form.steps.value);
      const eta = Number(form.eta.value);
      const seed = Number(form.seed.value);
      if (!Number.isInteger(seed) || seed < 0) {
        status.textContent = "シードは 0 以上の整数にしてください。";
        return;
      }
      button.disabled = true;
      try {
        const { model, sched } = await load((p) => { status.textContent = demo.progressText(p); });
        const rand = mulberry32(seed);
        const x_T = randn(rand, sched.shape.reduce((a, b) => a * b));
        draw(canvasX, x_T, sched.shape);
        const start = performance.now();
        const name = className();
        const onStep = async (i, t, x, x0) => {
          draw(canvasX, x, sched.shape);
          draw(canvasX0, x0, sched.shape);
          const sec = ((performance.now() - start) / 1000).toFixed(2);
          status.textContent = `「${name}」を生成中: ステップ ${i + 1} / ${steps} (t = ${t})、${sec} 秒`;
          canvasX.setAttribute("aria-label", `途中の x_t (ステップ ${i + 1} / ${steps})`);
          canvasX0.setAttribute("aria-label", `そこから予測した x̂_0 (ステップ ${i + 1} / ${steps})`);
          await new Promise((resolve) => setTimeout(resolve, 0)); // 描いた画面を見せる
        };
        const x = await sample(model, sched, { y, guidance_scale, steps, eta, x_T, rand, onStep });
        draw(canvasX, x, sched.shape);
        const sec = ((performance.now() - start) / 1000).toFixed(2);
        const desc = `「${name}」の生成画像 (DDIM ${steps} ステップ、η = ${eta}、`
          + `ガイダンス ${guidance_scale}、シード ${seed})`;
        canvasX.setAttribute("aria-label", desc);
        canvasX0.setAttribute("aria-label", `最後のステップで予測した x̂_0: ${desc}`);
        status.textContent = `${desc}。${sec} 秒で生成しました。`;
      } catch (err) {
        status.textContent = `生成できませんでした: ${err.message}`;
      } finally {
        button.disabled = false;
      }
    });
  }

  // ---------------------------------------------------------------- CI の自己テスト

  // ビルドが書き出した x_T から、ここのサンプラーで作った画像と PyTorch の画像の最大の差
  // (画像も返すので、CI は Python の側でも比べ直せます)。
  // 時間はガイダンスの強さごとに、初回 (first_ms) と、続く 4 回の最短 (ms) と中央値 (median_ms)。
  // CI の計算機はほかの仕事と共有なので、予算は timeit と同じく最短の回で比べます。
  window.torchbookDemoTests.diffusion = async () => {
    const { model, sched } = await load(null);
    const vec = await demo.fetchJSON(demo.url(TESTS));
    const cases = [];
    for (const c of vec.cases) {
      const args = { y: [vec.label], guidance_scale: c.guidance, steps: vec.steps, eta: vec.eta,
        x_T: Float32Array.from(vec.x_T), rand: null, onStep: null };
      const times = [];
      let x = null;
      for (let k = 0; k < 5; k++) {
        const start = performance.now();
        x = await sample(model, sched, args);
        times.push(performance.now() - start);
      }
      const warm = times.slice(1).sort((a, b) => a - b);
      let diff = 0;
      for (let i = 0; i < x.length; i++) diff = Math.max(diff, Math.abs(x[i] - c.image[i]));
      cases.push({ guidance: c.guidance, max_abs_diff: diff, first_ms: times[0], ms: warm[0],
        median_ms: (warm[1] + warm[2]) / 2,
        image: Array.from(x) });
    }
    return { steps: vec.steps, cases };
  };

  for (const root of document.querySelectorAll('[data-demo="diffusion"]')) setup(root);
})();
