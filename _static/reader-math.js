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
  window.addEventListener("reader-mathjax-ready", () => {
    mark();
    window.addEventListener("resize", mark);
  });
})();
