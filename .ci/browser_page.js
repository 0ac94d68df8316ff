// ブラウザーの検査 (.ci/browser_check.py) がページの中で実行する関数。
// どれも JSON にできる値を返します。
window.__bookCheck = {
  // 本文 ([role=main]) の文字列。script と style は除きます (検索の期待値に使う)。
  mainText() {
    const main = document.querySelector('[role="main"]');
    if (!main) return "";
    const clone = main.cloneNode(true);
    // 前後のページへのリンク (他のページの題名) は、このページの本文ではない
    clone.querySelectorAll("script, style, .headerlink, .prev-next-area").forEach((e) => e.remove());
    return clone.textContent;
  },

  // 初回表示の時刻 (ms)
  firstPaint() {
    const e = performance.getEntriesByType("paint");
    const fcp = e.find((x) => x.name === "first-contentful-paint") || e[0];
    return fcp ? Math.round(fcp.startTime) : null;
  },

  // 文字 ch を font で描いた画像が、字形の無い文字 (豆腐) と同じなら true
  _tofu(ch, family, cache) {
    const key = family + "\u0000" + ch;
    if (key in cache) return cache[key];
    const draw = (text) => {
      const c = document.createElement("canvas");
      c.width = 48; c.height = 48;
      const g = c.getContext("2d");
      g.font = `32px ${family}`;
      g.textBaseline = "top";
      g.fillText(text, 4, 4);
      return Array.from(g.getImageData(0, 0, 48, 48).data).join(",");
    };
    // U+0378 は未割り当ての符号位置: どのフォントにも無いので必ず豆腐になる
    const notdef = cache["notdef" + family] ??= draw("\u0378");
    return (cache[key] = draw(ch) === notdef);
  },

  // 図 (<img> の SVG・PNG、本文中の <svg>) を調べます
  async figures() {
    const out = [];
    const cache = {};
    const jp = /[\u3040-\u30ff\u3400-\u9fff\uff00-\uffef]/g;
    const main = document.querySelector('[role="main"]') || document.body;
    const checkSvg = (svgEl, displayedWidth, label) => {
      const vb = svgEl.viewBox && svgEl.viewBox.baseVal;
      let userWidth = vb && vb.width ? vb.width : parseFloat(svgEl.getAttribute("width"));
      const texts = Array.from(svgEl.querySelectorAll("text"));
      let minFont = Infinity;
      const missing = new Set();
      for (const t of texts) {
        let fs = null, fam = null;
        for (let n = t; n && n.getAttribute; n = n.parentNode) {
          const st = n.getAttribute("style") || "";
          fs ??= n.getAttribute("font-size") || (st.match(/font-size:\s*([\d.]+)/) || [])[1];
          fam ??= n.getAttribute("font-family") || (st.match(/font-family:\s*([^;]+)/) || [])[1];
        }
        if (fs && t.textContent.trim()) minFont = Math.min(minFont, parseFloat(fs));
        const family = (fam ? fam + ", " : "") + "sans-serif";
        for (const ch of t.textContent.match(jp) || []) {
          if (this._tofu(ch, family, cache)) missing.add(ch);
        }
      }
      const scale = userWidth ? displayedWidth / userWidth : null;
      out.push({
        kind: "svg", src: label, displayed: Math.round(displayedWidth),
        min_text_px: minFont < Infinity && scale ? +(minFont * scale).toFixed(2) : null,
        missing_glyphs: [...missing].join(""),
      });
    };
    // 遅延読み込みの画像も、いま読み込んで大きさを測る
    const imgs = Array.from(main.querySelectorAll("img"));
    imgs.forEach((img) => (img.loading = "eager"));
    await Promise.all(imgs.map((img) => img.decode().catch(() => null)));
    for (const img of imgs) {
      if (img.closest(".navbar-brand, .bd-header, .dropdown-menu, .btn")) continue;
      const src = img.getAttribute("src") || "";
      const w = img.getBoundingClientRect().width;
      if (/\.svg(\?|$)/.test(src)) {
        const text = await (await fetch(img.src)).text();
        const doc = new DOMParser().parseFromString(text, "image/svg+xml");
        checkSvg(doc.documentElement, w, src);
      } else {
        out.push({ kind: "raster", src, displayed: Math.round(w), natural: img.naturalWidth });
      }
    }
    main.querySelectorAll("svg").forEach((svg, i) => {
      if (!svg.querySelector("text") || svg.closest("mjx-container, .MathJax")) return;
      checkSvg(svg, svg.getBoundingClientRect().width, `inline-svg-${i}`);
    });
    return out;
  },

  // ダウンロードできる .ipynb に、実行結果が入っているか
  async notebooks() {
    const out = [];
    const links = new Set(
      Array.from(document.querySelectorAll('a[href$=".ipynb"]')).map((a) => a.href)
    );
    const shown = document.querySelectorAll(".cell_output").length;
    for (const href of links) {
      if (new URL(href).host !== location.host) continue;
      const res = await fetch(href);
      if (!res.ok) { out.push({ href, error: `HTTP ${res.status}` }); continue; }
      const nb = await res.json();
      const code = nb.cells.filter((c) => c.cell_type === "code");
      const withOut = code.filter((c) => (c.outputs || []).length > 0).length;
      out.push({ href, code: code.length, with_outputs: withOut, shown });
    }
    return out;
  },

  visible(el) {
    if (!el) return false;
    const r = el.getBoundingClientRect();
    const s = getComputedStyle(el);
    return r.width > 0 && r.height > 0 && s.visibility !== "hidden" && s.display !== "none";
  },

  // 画面に見えている ☰ / 目次ボタンの中心座標
  toggleCenter(kind) {
    const el = Array.from(document.querySelectorAll(`.${kind}-toggle`)).find((b) => this.visible(b));
    if (!el) return null;
    const r = el.getBoundingClientRect();
    return { x: r.x + r.width / 2, y: r.y + r.height / 2 };
  },

  // 引き出し (ダイアログ) またはサイドバーに、見えているリンクが何本あるか
  drawerState(kind) {
    const dialog = document.getElementById(`pst-${kind}-sidebar-modal`);
    const sidebar = document.getElementById(`pst-${kind}-sidebar`);
    const box = dialog && dialog.open ? dialog : sidebar;
    const links = box ? Array.from(box.querySelectorAll("a")).filter((a) => {
      const r = a.getBoundingClientRect();
      return this.visible(a) && r.right > 0 && r.left < innerWidth;
    }).length : 0;
    return { dialogOpen: !!(dialog && dialog.open), visibleLinks: links };
  },

  closeDrawers() {
    document.querySelectorAll("dialog[open]").forEach((d) => d.close());
  },

  // 検索ページの結果 (完了を待ってから、見つかったページの一覧)
  // 見出しが「検索中」から「検索結果」に変わり、抜粋の取得が済んだら完了
  searchDone() {
    const h = document.querySelector("#search-results h2");
    if (!h || h.textContent.trim() !== Documentation.gettext("Search Results")) return false;
    const items = document.querySelectorAll("#search-results ul.search > li");
    return Array.from(items).every((li) => li.querySelector("p.context"));
  },
  searchResults() {
    return Array.from(document.querySelectorAll("#search-results ul.search > li")).map((li) => ({
      href: li.querySelector("a").getAttribute("href").split("#")[0],
      snippet: (li.querySelector("p.context") || { textContent: "" }).textContent,
    }));
  },
};
