// 列に収まらない長い数式 (横にスクロールできる) を、キーボードでもスクロールできるようにします。
// MathJax が数式を描き終えてから (reader-mathjax-ready)、はみ出している数式だけに tabindex="0" を付けます。
(() => {
  const mark = () => {
    document.querySelectorAll('mjx-container[display="true"]').forEach((el) => {
      if (el.scrollWidth > el.clientWidth + 1) {
        el.tabIndex = 0;
        el.setAttribute("role", "region");
        el.setAttribute("aria-label", "数式 (横にスクロールできます)");
      } else {
        el.removeAttribute("tabindex");
      }
    });
  };
  let started = false;
  const start = () => {
    mark();
    if (!started) window.addEventListener("resize", mark);
    started = true;
  };
  // MathJax を遅れて読むとき (reader_fixes) は reader-mathjax-ready、すぐ読むときは startup.promise
  window.addEventListener("reader-mathjax-ready", start);
  window.addEventListener("load", () => {
    const mj = window.MathJax;
    if (mj && mj.startup && mj.startup.promise) mj.startup.promise.then(start);
  });
})();
