// 05 章「数字を書いてみる」: 読者が書いた数字を、章で学習したモデル (ONNX) がブラウザーで読みます。
//
// 前処理は MNIST を作ったときと同じ手順です (booktools/webdemo.py の mnist_preprocess と 1 行ずつ対応):
//   1. 書いた部分を囲む最小の長方形 (バウンディングボックス) を切り出す
//   2. 縦横比を保って、長いほうの辺が 20 画素になるよう縮める (面積の平均)
//   3. 28×28 の中に、重心が中央 (14, 14) に来るように置く
//   4. 章と同じ定数で正規化する ((値 − 平均) ÷ 標準偏差)
// 定数・クラスの並び・ファイル名は、ビルドが書き出した mnist.json から読みます (ここには書きません)。
(() => {
  "use strict";

  const root = document.querySelector('[data-demo="mnist"]');
  const api = window.torchbookDemo;
  if (!root || !api) return;

  const SIZE = 280; // 書く欄の大きさ (CSS px、内部の画素も同じ)
  const LINE = 22; // ペンの太さ: 数字の高さ約 200 px の 1/9 ほど (MNIST の線の太さに近い)

  let meta = null; // mnist.json の中身
  let session = null; // ort.InferenceSession
  let starting = null; // 読み込み中の Promise
  let samples = null; // 見本の数字 (mnist-tests.json)
  let sampleIndex = 0;
  let drawing = false;
  let hasInk = false;
  let lastLatencyMs = null;

  // ---- 画面の部品を作る
  const el = (tag, attrs = {}, text = "") => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text) e.textContent = text;
    return e;
  };
  if (api.fileNotice(root)) return;
  root.replaceChildren();
  const pad = el("div", { class: "mnist-pad" });
  const canvas = el("canvas", {
    width: SIZE, height: SIZE, class: "mnist-canvas", role: "img", tabindex: "0",
    "aria-label": "数字を書く欄。マウス、ペン、指で 0 から 9 の数字を 1 つ書きます",
    "aria-describedby": "mnist-demo-help",
  });
  canvas.textContent = "数字を書く欄 (このブラウザーでは canvas を表示できません)";
  const help = el("p", { id: "mnist-demo-help", class: "mnist-help" },
    "枠の中に数字を 1 つ書いてください。線を引き終えるたびに、モデルの予測を下に示します。"
    + "キーボードでは「見本を書く」でテストデータの数字を欄に書けます。");
  const buttons = el("div", { class: "mnist-buttons" });
  const clearBtn = el("button", { type: "button" }, "消す");
  const sampleBtn = el("button", { type: "button" }, "見本を書く");
  buttons.append(clearBtn, sampleBtn);
  pad.append(canvas, buttons, help);

  const seen = el("figure", { class: "mnist-seen" });
  const small = el("canvas", {
    width: 28, height: 28, class: "mnist-input", role: "img",
    "aria-label": "モデルが実際に受け取る 28×28 画素の入力を拡大した画像",
  });
  seen.append(small, el("figcaption", {}, "モデルが見る 28×28 の入力"));

  const bars = el("div", { class: "mnist-bars", role: "group", "aria-label": "各数字の確率" });
  const barRows = [];
  const status = el("p", { class: "mnist-status", "aria-live": "polite" },
    "書き始めると、モデルと実行環境を読み込みます。");
  root.append(pad, seen, bars, status);
  root.classList.add("mnist-demo");

  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  const smallCtx = small.getContext("2d");

  function buildBars(classes) {
    bars.replaceChildren();
    barRows.length = 0;
    for (const name of classes) {
      const row = el("div", { class: "mnist-bar" });
      const label = el("span", { class: "mnist-bar-label" }, name);
      const track = el("span", { class: "mnist-bar-track", "aria-hidden": "true" });
      const fill = el("span", { class: "mnist-bar-fill" });
      track.append(fill);
      const value = el("span", { class: "mnist-bar-value" }, "–");
      row.append(label, track, value);
      bars.append(row);
      barRows.push({ row, fill, value });
    }
  }

  // ---- 読み込み (最初に書き始めたとき、または「見本を書く」を押したときだけ)
  function start() {
    if (!starting) {
      const show = (p) => { status.textContent = api.progressText(p); };
      starting = (async () => {
        meta = await api.fetchJSON(api.url("mnist.json"));
        buildBars(meta.classes);
        session = await api.loadModel(api.url(meta.model), show);
        await run(new Float32Array(meta.size * meta.size)); // 1 回目の遅い実行を先に済ませる
        status.textContent = "準備ができました。数字を書いてください。";
      })();
      starting.catch((err) => {
        starting = null;
        status.textContent = `読み込みに失敗しました: ${err.message}`;
      });
    }
    return starting;
  }

  // ---- 前処理 (MNIST と同じ手順)。ink は高さ h・幅 w の 0〜1 の濃さ (Float32Array)
  function preprocess(ink, h, w) {
    const n = meta.size; // 28
    const box = meta.box; // 20
    // 1. 書いた部分のバウンディングボックス
    let top = h, bottom = -1, left = w, right = -1;
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        if (ink[y * w + x] > 0) {
          if (y < top) top = y;
          if (y > bottom) bottom = y;
          if (x < left) left = x;
          if (x > right) right = x;
        }
      }
    }
    if (bottom < 0) return null; // 何も書いていない
    const bh = bottom - top + 1, bw = right - left + 1;
    // 2. 長いほうの辺を box 画素に (縦横比を保つ)。各出力画素は、覆う元の画素の面積の平均
    const scale = box / Math.max(bh, bw);
    const oh = Math.max(1, Math.round(bh * scale)), ow = Math.max(1, Math.round(bw * scale));
    const rows = areaWeights(bh, oh), cols = areaWeights(bw, ow);
    const resized = new Float64Array(oh * ow);
    for (let i = 0; i < oh; i++) {
      for (const [y, wy] of rows[i]) {
        for (let j = 0; j < ow; j++) {
          let s = 0;
          for (const [x, wx] of cols[j]) s += wx * ink[(top + y) * w + left + x];
          resized[i * ow + j] += wy * s;
        }
      }
    }
    // 3. 重心 (画素の中心で測る) が 28×28 の中央に来る位置に置く (はみ出さないように制限)
    let mass = 0, my = 0, mx = 0;
    for (let i = 0; i < oh; i++) {
      for (let j = 0; j < ow; j++) {
        const v = resized[i * ow + j];
        mass += v;
        my += v * (i + 0.5);
        mx += v * (j + 0.5);
      }
    }
    const clamp = (v, hi) => Math.min(Math.max(v, 0), hi);
    const oy = clamp(Math.round(n / 2 - my / mass), n - oh);
    const ox = clamp(Math.round(n / 2 - mx / mass), n - ow);
    const pixels = new Float32Array(n * n);
    for (let i = 0; i < oh; i++) {
      for (let j = 0; j < ow; j++) pixels[(oy + i) * n + ox + j] = resized[i * ow + j];
    }
    // 4. 正規化
    const input = new Float32Array(n * n);
    for (let k = 0; k < n * n; k++) input[k] = (pixels[k] - meta.mean) / meta.std;
    return { pixels, input };
  }

  // 長さ src を長さ dst に縮めるときの、出力 i ごとの [元の位置, 重み] の組 (重みの和は 1)
  function areaWeights(src, dst) {
    const f = src / dst; // 出力 1 画素が覆う元の画素の数
    const out = [];
    for (let i = 0; i < dst; i++) {
      const a = i * f, b = (i + 1) * f;
      const list = [];
      for (let k = Math.floor(a); k < Math.min(Math.ceil(b), src); k++) {
        const overlap = Math.min(b, k + 1) - Math.max(a, k);
        if (overlap > 0) list.push([k, overlap / f]);
      }
      out.push(list);
    }
    return out;
  }

  // 書く欄の濃さ: 透明な欄に黒で書くので、不透明度 (アルファ) がそのまま濃さ
  function readInk() {
    const data = ctx.getImageData(0, 0, SIZE, SIZE).data;
    const ink = new Float32Array(SIZE * SIZE);
    for (let k = 0; k < ink.length; k++) ink[k] = data[4 * k + 3] / 255;
    return ink;
  }

  async function run(input) {
    const ort = window.ort;
    const n = meta.size;
    const feeds = { [meta.input]: new ort.Tensor("float32", input, [1, 1, n, n]) };
    const logits = (await session.run(feeds))[meta.output].data;
    // softmax (大きな値で桁あふれしないよう、最大値を引いてから exp)
    const top = Math.max(...logits);
    const e = Array.from(logits, (v) => Math.exp(v - top));
    const sum = e.reduce((a, b) => a + b, 0);
    const probs = e.map((v) => v / sum);
    probs.logits = Array.from(logits); // CI の照合用
    return probs;
  }

  function showInput(pixels) {
    const n = meta.size;
    const img = smallCtx.createImageData(n, n);
    for (let k = 0; k < n * n; k++) {
      const v = Math.round(255 * (1 - Math.min(1, pixels[k]))); // 白地に黒で表示
      img.data.set([v, v, v, 255], 4 * k);
    }
    smallCtx.putImageData(img, 0, 0);
  }

  function showProbs(probs) {
    let best = 0;
    probs.forEach((p, k) => {
      barRows[k].fill.style.width = `${(100 * p).toFixed(1)}%`;
      barRows[k].value.textContent = `${(100 * p).toFixed(1)}%`;
      if (p > probs[best]) best = k;
    });
    barRows.forEach((r, k) => r.row.classList.toggle("mnist-best", k === best));
    status.textContent = `予測: ${meta.classes[best]} (確率 ${(100 * probs[best]).toFixed(1)}%)`;
    return best;
  }

  // 線を引き終えたとき (または見本を書いたとき): 前処理 → 推論 → 棒の更新。t0 からの時間を測る
  async function update(t0) {
    await start();
    const ink = readInk();
    const prep = preprocess(ink, SIZE, SIZE);
    if (!prep) return null;
    const probs = await run(prep.input);
    showInput(prep.pixels);
    const best = showProbs(probs);
    lastLatencyMs = performance.now() - t0;
    root.dataset.latencyMs = lastLatencyMs.toFixed(2); // CI が読む
    return { ink, ...prep, probs, best, ms: lastLatencyMs };
  }

  function clear() {
    ctx.clearRect(0, 0, SIZE, SIZE);
    smallCtx.clearRect(0, 0, 28, 28);
    hasInk = false;
    for (const r of barRows) {
      r.fill.style.width = "0";
      r.value.textContent = "–";
      r.row.classList.remove("mnist-best");
    }
    if (session) status.textContent = "消しました。数字を書いてください。";
  }

  // 28×28 の見本 (0〜255) を、欄いっぱいに拡大して書く (読者が書いたものと同じ道を通る)
  function drawSample(image) {
    const n = Math.sqrt(image.length);
    const tmp = document.createElement("canvas");
    tmp.width = tmp.height = n;
    const t = tmp.getContext("2d");
    const img = t.createImageData(n, n);
    for (let k = 0; k < image.length; k++) img.data.set([0, 0, 0, image[k]], 4 * k);
    t.putImageData(img, 0, 0);
    ctx.clearRect(0, 0, SIZE, SIZE);
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(tmp, 0, 0, SIZE, SIZE);
    hasInk = true;
  }

  async function loadSamples() {
    await start();
    if (!samples) {
      const data = await api.fetchJSON(api.url(meta.tests));
      samples = data.images.map((b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)));
      samples.labels = data.labels;
    }
    return samples;
  }

  // ---- 入力 (マウス・ペン・タッチはどれも pointer イベント)
  function point(ev) {
    const r = canvas.getBoundingClientRect();
    return [(ev.clientX - r.left) * (SIZE / r.width), (ev.clientY - r.top) * (SIZE / r.height)];
  }
  canvas.addEventListener("pointerdown", (ev) => {
    ev.preventDefault();
    start(); // 書いているあいだに読み込みを進める
    drawing = true;
    canvas.setPointerCapture(ev.pointerId);
    ctx.lineWidth = LINE;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.strokeStyle = "#000";
    const [x, y] = point(ev);
    ctx.beginPath();
    ctx.moveTo(x, y);
    ctx.lineTo(x, y + 0.01); // 点を打っただけでも描く
    ctx.stroke();
    hasInk = true;
  });
  canvas.addEventListener("pointermove", (ev) => {
    if (!drawing) return;
    const [x, y] = point(ev);
    ctx.lineTo(x, y);
    ctx.stroke();
  });
  const end = (ev) => {
    if (!drawing) return;
    drawing = false;
    const t0 = performance.now();
    if (ev.pointerId !== undefined && canvas.hasPointerCapture(ev.pointerId)) {
      canvas.releasePointerCapture(ev.pointerId);
    }
    update(t0).catch((err) => { status.textContent = `予測に失敗しました: ${err.message}`; });
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  canvas.addEventListener("keydown", (ev) => {
    if (ev.key === "Delete" || ev.key === "Backspace") clear();
  });
  clearBtn.addEventListener("click", clear);
  sampleBtn.addEventListener("click", async () => {
    try {
      const s = await loadSamples();
      drawSample(s[sampleIndex]);
      sampleIndex = (sampleIndex + 1) % s.length;
      await update(performance.now());
    } catch (err) {
      status.textContent = `見本を書けませんでした: ${err.message}`;
    }
  });

  // ---- CI の自己テスト: 本物のテスト画像を、読者の入力と同じ道 (欄に書く → 前処理 → 推論) で通す
  window.torchbookDemoTests.mnist = async () => {
    const s = await loadSamples();
    const digits = [];
    for (let k = 0; k < s.length; k++) {
      drawSample(s[k]);
      const r = await update(performance.now());
      let bin = "";
      for (const v of r.ink) bin += String.fromCharCode(Math.round(255 * v));
      digits.push({
        label: s.labels[k],
        ink: btoa(bin), // 前処理に渡した欄の濃さ (0〜255)
        input: Array.from(r.input),
        probs: Array.from(r.probs),
        logits: r.probs.logits,
        ms: r.ms,
      });
    }
    clear();
    return { canvas: SIZE, threads: window.ort.env.wasm.numThreads, digits,
      hasInk, lastLatencyMs };
  };
})();
