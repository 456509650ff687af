"""Tiny datasets written in the real on-disk formats, so torchvision's own parsers read them."""
import os
import pickle
import struct

import numpy as np

from datamodules.datasets import CIFAR10_CLASSES, CIFAR100_CLASSES


def write_idx(path: str, array: np.ndarray) -> None:
    """IDX (the MNIST format): magic 0x0000 08 <ndim>, big-endian int32 dims, then uint8 data."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def _images_labels(rng, n: int, size: int, classes: int, channels: int = 1):
    labels = np.arange(n) % classes  # every class present
    rng.shuffle(labels)
    images = rng.integers(0, 256, (n, size, size, channels) if channels > 1 else (n, size, size), dtype=np.uint8)
    return images, labels


def write_mnist(root: str, folder: str = "MNIST", n_train: int = 60, n_test: int = 20, seed: int = 0) -> None:
    """MNIST / FashionMNIST raw files under root/<folder>/raw/."""
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw, exist_ok=True)
    rng = np.random.default_rng(seed)
    for part, n in (("train", n_train), ("t10k", n_test)):
        images, labels = _images_labels(rng, n, 28, 10)
        write_idx(os.path.join(raw, f"{part}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{part}-labels-idx1-ubyte"), labels)


def write_emnist(root: str, split: str = "byclass", n_train: int = 124, n_test: int = 62, seed: int = 0,
                 images: dict = None) -> None:
    """EMNIST raw files (images stored transposed, as in the real files) under root/EMNIST/raw/."""
    raw = os.path.join(root, "EMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 27, "digits": 10, "mnist": 10}[split]
    for part, n in (("train", n_train), ("test", n_test)):
        data, labels = _images_labels(rng, n, 28, classes)
        if images and part in images:
            data = images[part]
        write_idx(os.path.join(raw, f"emnist-{split}-{part}-images-idx3-ubyte"), data)
        write_idx(os.path.join(raw, f"emnist-{split}-{part}-labels-idx1-ubyte"), labels[: len(data)])


def write_cifar(root: str, hundred: bool = False, per_batch: int = 20, n_test: int = 40, seed: int = 0) -> None:
    """CIFAR-10 (5 data batches + test + batches.meta) or CIFAR-100 (train + test + meta) python pickles."""
    rng = np.random.default_rng(seed)
    classes = 100 if hundred else 10
    folder = os.path.join(root, "cifar-100-python" if hundred else "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    label_key = "fine_labels" if hundred else "labels"

    def dump(name, n):
        images, labels = _images_labels(rng, n, 32, classes, channels=3)
        data = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # rows are R plane, G plane, B plane
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": data, label_key: labels.tolist()}, f)

    if hundred:
        dump("train", per_batch * 5)
        dump("test", n_test)
        meta = {"fine_label_names": CIFAR100_CLASSES, "coarse_label_names": [f"c{i}" for i in range(20)]}
        with open(os.path.join(folder, "meta"), "wb") as f:
            pickle.dump(meta, f)
    else:
        for i in range(1, 6):
            dump(f"data_batch_{i}", per_batch)
        dump("test_batch", n_test)
        with open(os.path.join(folder, "batches.meta"), "wb") as f:
            pickle.dump({"label_names": CIFAR10_CLASSES}, f)


def write_all(root: str) -> None:
    write_mnist(root, "MNIST")
    write_mnist(root, "FashionMNIST", seed=1)
    write_emnist(root)
    write_cifar(root, hundred=False, per_batch=20)
    write_cifar(root, hundred=True, per_batch=40, n_test=100)


def tiny_clip_tokenizer():
    """Byte-level BPE with no merges: every byte is a token (the real vocabulary's first 512 entries)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({token: i + 2 for i, token in enumerate(chars + [c + "</w>" for c in chars])})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def write_tiny_clip(folder: str) -> str:
    """A random CLIP (2 layers, width 32, ViT patch 32 on 224x224) saved like a hub snapshot; returns folder.

    initializer_factor 10: with the default init every image embedding points the same way and all images
    get the same class, which would hide a mix-up between images.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, initializer_factor=10.0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32, initializer_factor=10.0),
        projection_dim=16, initializer_factor=10.0)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)  # shortest edge 224, center crop 224, CLIP mean/std
    tokenizer.save_pretrained(folder)
    return folder
