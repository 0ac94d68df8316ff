// ブラウザーで動くデモの共通部品 (_ext/webdemo.py がデモのあるページだけに読み込みます)。
//
// ONNX Runtime Web (WebAssembly 版) とモデルは、読者がデモを始めたときに初めて読みます。
// ページを開いただけでは何も読まないので、章のページの重さは増えません。
// ファイルはすべてこのサイトの _static/webdemo/ から読み、外のサーバーへは通信しません。
//
// 各デモ (demo-<名前>.js) が使う API:
//   torchbookDemo.url("mnist.onnx")           → _static/webdemo/mnist.onnx の URL
//   torchbookDemo.loadRuntime(onProgress)      → ort (一度だけ読み、2 回目からは同じもの)
//   torchbookDemo.loadModel(url, onProgress)   → ort.InferenceSession
//   torchbookDemo.fetchJSON(url, onProgress)   → JSON の中身
//   torchbookDemo.fileNotice(root)             → file:// で開いたなら案内を出して true
//   torchbookDemo.progressText(p)              → 「読み込み中 3.1 / 14.2 MB」のような文
// onProgress は {label, loaded, total} (バイト数。total が分からなければ 0) を受け取ります。
//
// CI の自己テスト: 各デモは window.torchbookDemoTests[名前] = async () => ({...}) を登録します。
// .ci/demo_check.py がそれを呼び、結果を PyTorch の答えと比べます。
(() => {
  "use strict";

  const script = document.currentScript;
  // このファイルの URL から _static/ の場所を求める (ページの深さによらない)
  const staticBase = new URL(".", script ? script.src : location.href).href;
  const demoBase = staticBase + "webdemo/";
  const ortBase = demoBase + "ort/";
  const isFile = location.protocol === "file:";

  let runtimePromise = null;

  function url(name) {
    return demoBase + name;
  }

  // fetch して、届いたバイト数を onProgress で知らせながら ArrayBuffer にする
  async function fetchBytes(href, label, onProgress) {
    const res = await fetch(href);
    if (!res.ok) throw new Error(`${href} を読めません (HTTP ${res.status})`);
    const total = Number(res.headers.get("Content-Length")) || 0;
    if (!res.body || !onProgress) return new Uint8Array(await res.arrayBuffer());
    const reader = res.body.getReader();
    const chunks = [];
    let loaded = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(value);
      loaded += value.length;
      onProgress({ label, loaded, total });
    }
    const out = new Uint8Array(loaded);
    let pos = 0;
    for (const c of chunks) {
      out.set(c, pos);
      pos += c.length;
    }
    return out;
  }

  function loadScript(src) {
    return new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = src;
      s.onload = resolve;
      s.onerror = () => reject(new Error(`${src} を読めません`));
      document.head.appendChild(s);
    });
  }

  // ランタイム: 読み込み口の ort.wasm.min.js (約 50 kB) と WebAssembly 本体 (約 14 MB)
  function loadRuntime(onProgress) {
    if (!runtimePromise) {
      runtimePromise = (async () => {
        if (isFile) throw new Error("file:// ではランタイムを読めません");
        if (onProgress) onProgress({ label: "ランタイム", loaded: 0, total: 0 });
        await loadScript(ortBase + "ort.wasm.min.js");
        const ort = window.ort;
        const wasm = await fetchBytes(ortBase + "ort-wasm-simd-threaded.wasm", "ランタイム", onProgress);
        ort.env.wasm.wasmPaths = ortBase; // .mjs もサイトの中から読む
        ort.env.wasm.wasmBinary = wasm; // 上で読んだものを使う (進み具合を出すため)
        // 複数スレッドには cross-origin isolation (COOP/COEP のヘッダー) が要る。静的なサイトでは 1 本
        ort.env.wasm.numThreads = self.crossOriginIsolated
          ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
        ort.env.logLevel = "error";
        return ort;
      })();
      runtimePromise.catch(() => { runtimePromise = null; }); // 失敗したら次にやり直せるように
    }
    return runtimePromise;
  }

  async function loadModel(href, onProgress) {
    const ort = await loadRuntime(onProgress);
    const bytes = await fetchBytes(href, "モデル", onProgress);
    return ort.InferenceSession.create(bytes, {
      executionProviders: ["wasm"],
      graphOptimizationLevel: "all",
    });
  }

  async function fetchJSON(href, onProgress) {
    const bytes = await fetchBytes(href, "データ", onProgress);
    return JSON.parse(new TextDecoder().decode(bytes));
  }

  function progressText(p) {
    const mb = (n) => (n / 1e6).toFixed(1);
    if (!p.loaded) return `${p.label}を読み込んでいます…`;
    return p.total
      ? `${p.label}を読み込んでいます… ${mb(p.loaded)} / ${mb(p.total)} MB`
      : `${p.label}を読み込んでいます… ${mb(p.loaded)} MB`;
  }

  // file:// で開いたページでは、ブラウザーが WebAssembly とモデルの読み込みを止めます。
  // その場合は見方を 1 行で案内し、true を返します。
  function fileNotice(root) {
    if (!isFile) return false;
    const p = document.createElement("p");
    p.className = "torchbook-demo-file-notice";
    p.setAttribute("role", "note");
    p.textContent = "このデモはファイルを直接開いたページ (file://) では動きません。"
      + "ビルドしたフォルダー (_build/html) で python -m http.server を実行し、"
      + "http://localhost:8000/ から開いてください。";
    root.replaceChildren(p);
    return true;
  }

  window.torchbookDemo = { url, loadRuntime, loadModel, fetchJSON, fileNotice, progressText,
    isFile, staticBase };
  window.torchbookDemoTests = window.torchbookDemoTests || {};
})();
