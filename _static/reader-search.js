// 検索結果の抜粋を読みやすくする修正 (検索ページだけで読みます)。
// - 数式の TeX (\frac など) やボタンの文字 (「コードを表示」など) を抜粋から除きます。
// - 抜粋は、2 文字組に分けた検索語ではなく、入力した語そのものの位置から始めます。
(() => {
  const NOISE = [
    ".headerlink", "script", "style", "button", "summary", ".toggle-button",
    ".copybtn", ".math", "mjx-container", ".MathJax", "math", ".katex",
    ".cell_input .highlight-none", ".sd-btn", "nav",
  ].join(", ");

  const patch = () => {
    if (typeof Search === "undefined") return false;
    Search.htmlToText = (htmlString, anchor) => {
      const doc = new DOMParser().parseFromString(htmlString, "text/html");
      doc.querySelectorAll(NOISE).forEach((el) => el.remove());
      const main = doc.querySelector('[role="main"]');
      const root = (anchor && main && main.querySelector(anchor)) || main;
      return root ? root.textContent.replace(/\s+/g, " ") : "";
    };
    Search.makeSearchSummary = (htmlText, keywords, anchor) => {
      const text = Search.htmlToText(htmlText, anchor);
      if (!text) return null;
      const query = (new URLSearchParams(location.search).get("q") || "").trim();
      const lower = text.toLowerCase();
      const candidates = [query, ...query.split(/\s+/), ...keywords]
        .filter((k) => k)
        .map((k) => lower.indexOf(k.toLowerCase()))
        .filter((i) => i > -1);
      const at = candidates.length ? candidates[0] : 0;
      const start = Math.max(at - 60, 0);
      const summary = document.createElement("p");
      summary.classList.add("context");
      summary.textContent =
        (start ? "…" : "") + text.substr(start, 200).trim() + (start + 200 < text.length ? "…" : "");
      return summary;
    };
    return true;
  };
  if (!patch()) document.addEventListener("DOMContentLoaded", patch);
})();
