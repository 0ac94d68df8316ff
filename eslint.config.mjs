// 本書のブラウザー用 JavaScript (_static/*.js、.ci/*.js) の静的検査 (eslint の推奨ルール)。
//   npx --no-install eslint _static .ci
import js from "@eslint/js";
import globals from "globals";

export default [
  js.configs.recommended,
  {
    files: ["_static/**/*.js", ".ci/**/*.js"],
    languageOptions: {
      ecmaVersion: 2022,
      sourceType: "script", // <script> で読むファイル (モジュールではない)
      // Search と Documentation は Sphinx の検索ページが定義するもの
      globals: { ...globals.browser, Search: "readonly", Documentation: "readonly" },
    },
  },
];
