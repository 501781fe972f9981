"""Datasets: digits (embedded in scikit-learn), CIFAR-10 (torchvision), ImageNet 64×64 (downsampled npz)."""
