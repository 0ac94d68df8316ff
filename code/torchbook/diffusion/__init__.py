"""DDPM / DDIM による画像生成 (Fashion-MNIST)。このフォルダーごとコピーして使えます。"""
