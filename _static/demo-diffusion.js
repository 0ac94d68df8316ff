// 第 8 章「ブラウザーで生成する」と第 10 章の潜在拡散のデモ: 同梱の ONNX のモデルで、
// 画像をブラウザーの中で生成します。
//
// サンプラーは code/torchbook/diffusion/sampling.py の guided_eps・ddim_step・flow_step と
// sample のループを 1 行ずつ写したもので、変数名も Python と同じにしています。
// どのデモも同じサンプラーを使い、違いはメタデータ (<名前>.json) だけです:
//   kind "ddim" (第 8 章): 画素の ε 予測モデルを DDIM で。ᾱ_t と時刻の列もメタデータから
//   kind "flow" (第 10 章): 潜在変数の上でフローの ODE (オイラー法・ホイン法) を解き、
//                最後にデコーダー (別の ONNX) で画像に戻す。「ライブ」の設定 (モデルの
//                ファイル、解き方、ステップ数) も meta.live から読む
// ランタイムとモデルは、読者がデモを始めたときに初めて読みます (webdemo-loader.js)。
(() => {
  "use strict";

  const demo = window.torchbookDemo;

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

  // [flow_step]
  // フローの ODE dx/dt = v(x, t) を t から t_next (< t) へ 1 ステップ進める。
  // オイラー法は始点の傾き v だけ、ホイン法は仮に進んだ先の傾きとの平均 (最後の 1 ステップはオイラー法)
  async function flow_step(predict, x, t, t_next, method = "euler") {
    const v = await predict(x, t);
    let x_next = x.map((xi, i) => xi + (t_next - t) * v[i]);
    if (method === "heun" && t_next > 0) {
      const v_next = await predict(x_next, t_next);
      x_next = x.map((xi, i) => xi + (t_next - t) * (v[i] + v_next[i]) / 2);
    }
    return x_next;
  }
  // [/flow_step]

  // [sample]
  // sample() のループ。sched.kind が "flow" ならフローの ODE を t = 1 から 0 へ、
  // "ddim" なら Python の ddim_timesteps が書き出した時刻の列をたどる。
  // onStep(i, t, x, x0) は各ステップの後に呼ぶ (x0 は DDIM の予測 x̂_0。フローでは null)
  async function sample(model, sched, { y, guidance_scale, method, steps, eta = 0, x_T,
    rand = null, onStep = null }) {
    let x = x_T;
    if (sched.kind === "flow") {
      // predict(x, t): UNet には 1000·t を渡す (losses.FLOW_TIME_SCALE。値はメタデータから)
      const predict = (x, t) => guided_eps(model, x, [t * sched.time_scale], y, guidance_scale);
      for (let i = 0; i < steps; i++) {
        const t = 1 - i / steps; // flow_times
        const t_next = 1 - (i + 1) / steps;
        x = await flow_step(predict, x, t, t_next, method);
        if (onStep) await onStep(i, t_next, x, null);
      }
      return to_images(model, x);
    }
    const times = sched.timesteps[String(steps)];
    for (let i = 0; i < times.length; i++) {
      const t = times[i];
      const eps = await guided_eps(model, x, [t], y, guidance_scale);
      const t_prev = i + 1 < times.length ? times[i + 1] : -1;
      const noise = eta > 0 ? randn(rand, x.length) : null;
      const { x_prev, x0 } = ddim_step(sched, eps, t, t_prev, x, eta, noise);
      x = x_prev;
      if (onStep) await onStep(i, t, x, x0);
    }
    return to_images(model, x);
  }
  // [/sample]

  // to_images: 潜在空間のモデル (decode を持つ) ならデコーダーを通し、画素なら [-1, 1] に切り詰める
  function to_images(model, x) {
    return model.decode ? model.decode(x) : x.map((v) => Math.min(Math.max(v, -1), 1));
  }

  // 2 つのノイズ a と b の間の球面線形補間 (slerp)。ノルムを保ったまま向きを回す。
  // 計算は float64 で、最後に Float32Array に丸める (booktools.diffusion_demo.slerp と同じ式)
  function slerp(a, b, w) {
    let dot = 0, na = 0, nb = 0;
    for (let i = 0; i < a.length; i++) {
      dot += a[i] * b[i];
      na += a[i] * a[i];
      nb += b[i] * b[i];
    }
    const theta = Math.acos(Math.min(Math.max(dot / (Math.sqrt(na) * Math.sqrt(nb)), -1), 1));
    if (Math.sin(theta) < 1e-6) return Float32Array.from(a); // 同じ向き: a のまま
    const sa = Math.sin((1 - w) * theta);
    const sb = Math.sin(w * theta);
    return a.map((v, i) => (sa * v + sb * b[i]) / Math.sin(theta));
  }

  // ---------------------------------------------------------------- モデルの読み込み

  // ONNX のセッションを、Python の model(x, t, y) と同じ形で呼べる関数にする
  function wrap(ort, session, meta) {
    const [C, H, W] = meta.shape;
    const [xName, tName, yName] = meta.inputs;
    const model = async (x, t, y) => {
      const n = t.length;
      const labels = y === null ? t.map(() => meta.null_class) : y; // y=None はクラスなし
      const time = meta.t_dtype === "float32"
        ? new ort.Tensor("float32", Float32Array.from(t), [n]) // フロー: 1000·t (実数)
        : new ort.Tensor("int64", BigInt64Array.from(t, BigInt), [n]); // DDPM: 整数の番号
      const feeds = {
        [xName]: new ort.Tensor("float32", x, [n, C, H, W]),
        [tName]: time,
        [yName]: new ort.Tensor("int64", BigInt64Array.from(labels, BigInt), [n]),
      };
      const out = await session.run(feeds);
      return out[meta.outputs[0]].data; // Float32Array (n·C·H·W)
    };
    model.null_class = meta.null_class;
    return model;
  }

  // デコーダーのセッションを decode(z) → 画像 (Float32Array、[-1, 1]) にする
  function wrapDecoder(ort, session, meta) {
    const n = 1; // デモは 1 枚ずつ
    return async (z) => {
      const feeds = { [meta.decoder_inputs[0]]: new ort.Tensor("float32", z, [n, ...meta.shape]) };
      const out = await session.run(feeds);
      return out[meta.decoder_outputs[0]].data;
    };
  }

  const loaded = {};

  // デモ name のランタイム・メタデータ・モデルを 1 度だけ読む (2 回目からは同じものを返す)。
  // 返すもの: sched (メタデータ)、model (「生成」用)、live (ライブ用。無ければ null)
  function load(name, onProgress) {
    if (!loaded[name]) {
      loaded[name] = (async () => {
        const ort = await demo.loadRuntime(onProgress);
        const meta = await demo.fetchJSON(demo.url(`${name}.json`), onProgress);
        const session = await demo.loadModel(demo.url(meta.model), onProgress);
        const model = wrap(ort, session, meta);
        let live = null;
        if (meta.decoder) {
          const decoder = await demo.loadModel(demo.url(meta.decoder), onProgress);
          model.decode = wrapDecoder(ort, decoder, meta);
          live = model;
          if (meta.live && meta.live.model !== meta.model) { // 少ないステップ用の別のモデル
            live = wrap(ort, await demo.loadModel(demo.url(meta.live.model), onProgress), meta);
            live.decode = model.decode;
          }
        }
        return { model, live, sched: meta };
      })();
      loaded[name].catch(() => { delete loaded[name]; }); // 失敗したら次にやり直す
    }
    return loaded[name];
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

  // スライダーの値をその隣の <output> に表示する
  function showSliderValues(form) {
    for (const input of form.querySelectorAll("input[type=range]")) {
      const out = form.querySelector(`output[for=${input.id}]`);
      const show = () => { out.textContent = input.value; };
      input.addEventListener("input", show);
      show();
    }
  }

  function seedOf(input) {
    const seed = Number(input.value);
    return Number.isInteger(seed) && seed >= 0 ? seed : null;
  }

  const SOLVER = { heun: "ホイン法", euler: "オイラー法" };

  // 第 8 章: 画素の DDIM。途中の x_t と予測した x̂_0 を 1 ステップごとに描く
  function setupPixel(root, name) {
    const form = root.querySelector("form");
    const button = form.querySelector("button");
    const status = root.querySelector("[role=status]");
    const [canvasX, canvasX0] = root.querySelectorAll("canvas");
    const className = () => form.label.options[form.label.selectedIndex].text;
    showSliderValues(form);

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const y = [Number(form.label.value)];
      const guidance_scale = Number(form.guidance.value);
      const steps = Number(form.steps.value);
      const eta = Number(form.eta.value);
      const seed = seedOf(form.seed);
      if (seed === null) {
        status.textContent = "シードは 0 以上の整数にしてください。";
        return;
      }
      button.disabled = true;
      try {
        const { model, sched } = await load(name, (p) => { status.textContent = demo.progressText(p); });
        const rand = mulberry32(seed);
        const x_T = randn(rand, sched.shape.reduce((a, b) => a * b));
        draw(canvasX, x_T, sched.shape);
        const start = performance.now();
        const label = className();
        const onStep = async (i, t, x, x0) => {
          draw(canvasX, x, sched.shape);
          draw(canvasX0, x0, sched.shape);
          const sec = ((performance.now() - start) / 1000).toFixed(2);
          status.textContent = `「${label}」を生成中: ステップ ${i + 1} / ${steps} (t = ${t})、${sec} 秒`;
          canvasX.setAttribute("aria-label", `途中の x_t (ステップ ${i + 1} / ${steps})`);
          canvasX0.setAttribute("aria-label", `そこから予測した x̂_0 (ステップ ${i + 1} / ${steps})`);
          await new Promise((resolve) => setTimeout(resolve, 0)); // 描いた画面を見せる
        };
        const x = await sample(model, sched,
          { y, guidance_scale, method: "ddim", steps, eta, x_T, rand, onStep });
        draw(canvasX, x, sched.shape);
        const sec = ((performance.now() - start) / 1000).toFixed(2);
        const desc = `「${label}」の生成画像 (DDIM ${steps} ステップ、η = ${eta}、`
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

  // 第 10 章: 潜在拡散。操作を動かすたびに左の画像を meta.live の少ないステップで描き直し、
  // 「生成」で右の画像を meta.method のステップ数で作る。出発点はどちらも
  // x_T = slerp(シード A のノイズ, シード B のノイズ, w)
  function setupLatent(root, name) {
    const form = root.querySelector("form");
    const button = form.querySelector("button");
    const status = root.querySelector("[role=status]");
    const [canvasLive, canvasFull] = root.querySelectorAll("canvas");
    showSliderValues(form);
    const noises = new Map(); // シード → ノイズ (同じシードは作り直さない)
    const noise = (seed, size) => {
      if (!noises.has(seed)) noises.set(seed, randn(mulberry32(seed), size));
      return noises.get(seed);
    };

    // 今の操作部品の値。シードが正しくなければ null
    function settings(sched) {
      const a = seedOf(form.seed);
      const b = seedOf(form.seed2);
      if (a === null || b === null) return null;
      const size = sched.shape.reduce((p, q) => p * q);
      const w = Number(form.w.value);
      return { y: [Number(form.label.value)], guidance_scale: Number(form.guidance.value), w,
        x_T: slerp(noise(a, size), noise(b, size), w),
        text: `「${form.label.options[form.label.selectedIndex].text}」、ガイダンス `
          + `${form.guidance.value}、シード ${a} と ${b} の間 w = ${w}` };
    }

    const progress = (p) => { status.textContent = demo.progressText(p); };
    let busy = false;
    let pending = false;

    // ライブ: 描き直しの途中に届いた操作は、終わった後に最新の値で 1 回だけ描き直す
    async function live() {
      if (busy) {
        pending = true;
        return;
      }
      busy = true;
      try {
        do {
          pending = false;
          const { live: model, sched } = await load(name, progress);
          const s = settings(sched);
          if (s === null) {
            status.textContent = "シードは 0 以上の整数にしてください。";
            break;
          }
          const start = performance.now();
          const x = await sample(model, sched, { ...s, method: sched.live.method,
            steps: sched.live.steps });
          const ms = performance.now() - start;
          draw(canvasLive, x, sched.image_shape);
          const desc = `${s.text} (${SOLVER[sched.live.method]} ${sched.live.steps} ステップ)`;
          canvasLive.setAttribute("aria-label", `ライブの画像: ${desc}`);
          status.textContent = `ライブ: ${desc}。${ms.toFixed(0)} ミリ秒で生成しました。`;
        } while (pending);
      } catch (err) {
        status.textContent = `生成できませんでした: ${err.message}`;
      } finally {
        busy = false;
      }
    }

    form.addEventListener("input", (event) => {
      if (event.target.name !== "steps") live(); // ステップ数は「生成」だけのもの
    });
    form.addEventListener("change", (event) => {
      if (event.target.tagName === "SELECT") live();
    });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      button.disabled = true;
      try {
        const { model, sched } = await load(name, progress);
        const s = settings(sched);
        if (s === null) {
          status.textContent = "シードは 0 以上の整数にしてください。";
          return;
        }
        const steps = Number(form.steps.value);
        const solver = SOLVER[sched.method];
        const start = performance.now();
        const onStep = async (i) => {
          status.textContent = `生成中: ${solver} ステップ ${i + 1} / ${steps}`;
          await new Promise((resolve) => setTimeout(resolve, 0)); // 画面を更新させる
        };
        const x = await sample(model, sched, { ...s, method: sched.method, steps, onStep });
        const ms = performance.now() - start;
        draw(canvasFull, x, sched.image_shape);
        const desc = `${s.text} (${solver} ${steps} ステップ)`;
        canvasFull.setAttribute("aria-label", `「生成」の画像: ${desc}`);
        status.textContent = `${desc}。${ms.toFixed(0)} ミリ秒で生成しました。`;
      } catch (err) {
        status.textContent = `生成できませんでした: ${err.message}`;
      } finally {
        button.disabled = false;
      }
    });
  }

  // ---------------------------------------------------------------- CI の自己テスト

  // run() を k 回動かし、結果と時間を返す: 初回 (first_ms、読み込みを含むことがある) と、
  // 続く回の最短 (ms) と中央値 (median_ms)。CI の計算機はほかの仕事と共有なので、
  // 予算は timeit と同じく最短の回で比べる
  async function timed(run, k) {
    const times = [];
    let x = null;
    for (let i = 0; i < k; i++) {
      const start = performance.now();
      x = await run();
      times.push(performance.now() - start);
    }
    const warm = times.slice(1).sort((a, b) => a - b);
    const mid = warm.length >> 1;
    const median = warm.length % 2 ? warm[mid] : (warm[mid - 1] + warm[mid]) / 2;
    return { x, first_ms: times[0], ms: warm[0], median_ms: median };
  }

  function maxAbsDiff(x, expected) {
    let diff = 0;
    for (let i = 0; i < x.length; i++) diff = Math.max(diff, Math.abs(x[i] - expected[i]));
    return diff;
  }

  // ビルドが書き出したノイズ (<名前>-tests.json) から、ここのサンプラーで作った画像と
  // PyTorch の画像の最大の差と時間 (画像も返すので、CI は Python の側でも比べ直せる)。
  // live_cases (潜在のデモ) は、slerp したノイズからライブの設定で作る 1 枚の時間
  async function selfTest(name) {
    const { model, live, sched } = await load(name, null);
    const vec = await demo.fetchJSON(demo.url(`${name}-tests.json`));
    const x_T = Float32Array.from(vec.x_T || vec.noise_a);
    const method = sched.kind === "flow" ? vec.method : "ddim";
    const cases = [];
    // 測る前に 1 回: WebAssembly の最初の数回は遅い (小さな潜在のグラフでは最初の場合だけ 3 倍)
    await sample(model, sched, { y: [vec.label], guidance_scale: 1, method, steps: vec.steps,
      x_T });
    for (const c of vec.cases) {
      const args = { y: [vec.label], guidance_scale: c.guidance, method, steps: vec.steps,
        eta: vec.eta || 0, x_T };
      const r = await timed(() => sample(model, sched, args), 5);
      cases.push({ guidance: c.guidance, max_abs_diff: maxAbsDiff(r.x, c.image),
        first_ms: r.first_ms, ms: r.ms, median_ms: r.median_ms, image: Array.from(r.x) });
    }
    const live_cases = [];
    for (const c of vec.live_cases || []) {
      const a = Float32Array.from(vec.noise_a);
      const b = Float32Array.from(vec.noise_b);
      const args = { y: [vec.label], guidance_scale: c.guidance, method: sched.live.method,
        steps: sched.live.steps };
      // 1 枚 = スライダーの位置からノイズを作り、少ないステップで解いてデコードするまで
      const r = await timed(() => sample(live, sched, { ...args, x_T: slerp(a, b, c.w) }), 11);
      live_cases.push({ w: c.w, guidance: c.guidance, max_abs_diff: maxAbsDiff(r.x, c.image),
        first_ms: r.first_ms, ms: r.ms, median_ms: r.median_ms, image: Array.from(r.x) });
    }
    return { kind: sched.kind, steps: vec.steps, method, live: sched.live || null, cases,
      live_cases };
  }

  // このファイルは data-demo="diffusion" と、data-script="diffusion" のデモ (潜在など) を動かす
  for (const root of document.querySelectorAll('[data-demo="diffusion"], [data-script="diffusion"]')) {
    const name = root.dataset.demo;
    window.torchbookDemoTests[name] = () => selfTest(name);
    if (demo.fileNotice(root)) continue;
    if (root.querySelector("input[name=w]")) setupLatent(root, name);
    else setupPixel(root, name);
  }
})();
