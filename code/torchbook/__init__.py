"""『PyTorch と拡散モデル』で実行・テストするコード。

章ごとに 1 モジュールです。mnist.py と diffusion/ は単独でコピーして使えます
(torch・torchvision・tqdm のほかに依存しません)。
"""

__version__ = "0.1.0"
