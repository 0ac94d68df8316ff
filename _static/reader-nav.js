// ☰ (章の一覧) と目次のボタンを、どの画面幅でも働かせる小さな修正。
//
// pydata-sphinx-theme 0.17 は、最初に見つかった .primary-toggle / .secondary-toggle
// (ページ上部の、本のテーマでは隠れているボタン) にだけ処理を結び付けます。
// sphinx-book-theme が本文の上に出す、実際に押せるボタンには何も結び付かないため、
// 押しても引き出しが開きません (pydata-sphinx-theme の issue 2451)。
// ここでは、処理の無いボタンが押されたら、処理のある最初のボタンを押したことにします。
// テーマが直ったら (最初のボタンが見えるボタンになったら)、この修正は何もしません。
(() => {
  const forward = (selector) => {
    const buttons = Array.from(document.querySelectorAll(selector));
    const bound = buttons[0];
    buttons.slice(1).forEach((button) => {
      button.addEventListener("click", (event) => {
        event.preventDefault();
        event.stopPropagation();
        bound.click();
      });
    });
  };
  const run = () => {
    forward(".primary-toggle");
    forward(".secondary-toggle");
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", run);
  else run();
})();
