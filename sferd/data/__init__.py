"""Datasets: digits (embedded in scikit-learn), CIFAR-10 (torchvision), ImageNet 64×64 (downsampled npz), and the
memory-mappable split folders the data stage writes them to (store.py)."""
