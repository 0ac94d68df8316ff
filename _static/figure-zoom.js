// 図を原寸で開く: 本文の図をクリック (またはフォーカスして Enter / スペース) すると、
// 原寸の図をダイアログで表示します。Esc、「閉じる」ボタン、図の外のクリックで閉じます。
(() => {
  "use strict";
  if (window.figureZoomLoaded) return;  // 2 回読まれても 1 回だけ動く
  window.figureZoomLoaded = true;

  // 対象は本文の図だけ (ロゴやボタンのアイコン、リンクの中の画像は除く)
  const SELECTOR = ".bd-article img";

  let dialog = null;
  let opener = null;  // 閉じたらフォーカスを戻す図

  function buildDialog() {
    dialog = document.createElement("dialog");
    dialog.className = "fz-dialog";
    dialog.setAttribute("aria-label", "原寸の図");
    const close = document.createElement("button");
    close.type = "button";
    close.className = "fz-close";
    close.textContent = "閉じる";
    close.addEventListener("click", () => dialog.close());
    const frame = document.createElement("div");
    frame.className = "fz-frame";
    dialog.append(close, frame);
    // ダイアログの外側 (背景) をクリックしたら閉じる
    dialog.addEventListener("click", (event) => {
      if (event.target === dialog) dialog.close();
    });
    dialog.addEventListener("close", () => {
      frame.replaceChildren();
      if (opener) opener.focus();
    });
    document.body.append(dialog);
  }

  function open(img) {
    if (!dialog) buildDialog();
    opener = img;
    const big = document.createElement("img");
    big.src = img.currentSrc || img.src;
    big.alt = img.alt;
    // 原寸: 画像そのものの大きさ (SVG は図に書かれた大きさ) で表示する
    if (img.naturalWidth) big.width = img.naturalWidth;
    dialog.querySelector(".fz-frame").replaceChildren(big);
    dialog.showModal();
    dialog.querySelector(".fz-close").focus();
  }

  function enable(img) {
    if (img.closest("a, button, .fz-dialog")) return;
    img.classList.add("fz-zoomable");
    img.tabIndex = 0;
    img.setAttribute("role", "button");
    const alt = img.getAttribute("alt") || "";
    img.setAttribute("aria-label", alt ? `原寸で開く: ${alt}` : "図を原寸で開く");
    img.title = "クリックで原寸表示";
    img.addEventListener("click", () => open(img));
    img.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        open(img);
      }
    });
  }

  function init() {
    document.querySelectorAll(SELECTOR).forEach(enable);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
