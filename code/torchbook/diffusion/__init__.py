"""拡散モデルとフローマッチングの画像生成 (Fashion-MNIST)。フォルダーごとコピーして使えます。

下の層 (ライブラリ): ``schedule`` (ノイズスケジュール)、``unet`` (ε を予測する UNet)、
``algorithms`` (DDPM の学習とサンプリングのループ: Ho et al. 2020 の Algorithm 1・2)、
``sampling`` (DDPM・DDIM・DPM-Solver++・フローの ODE・ガイダンスと既定値)、
``losses`` (ε 予測とフローマッチングの損失)、``training`` (EMA と学習率のスケジュール)、
``toy`` (2 次元の例)、``reflow`` (リフロー: ODE で作る組と直線性)、
``distill`` (段階的蒸留: 教師の 2 ステップを生徒の 1 ステップに)、
``autoencoder`` (潜在拡散の自己符号化器 VAE)、``conditioning`` (クラス名へのクロスアテンション)、
``latent`` (潜在空間の UNet とフローのモデル)、
``checkpoint`` (ファイル形式と読み書き)、``data`` (Fashion-MNIST)、``metrics`` (FID・KID)、
``fashion_classifier`` (特徴を作る分類器とその読み込み)、
``device`` (デバイスと bf16・channels_last の決定)、``options`` (CLI の引数の型と確認)。

上の層 (CLI、``python -m <このフォルダー>.train`` のように実行): ``train``、``sample``、
``evaluate``、``classifier``、``train_autoencoder``、``make_pairs``。
CLI はほかの CLI を import しません。
"""
