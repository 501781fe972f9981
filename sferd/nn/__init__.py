"""Neural networks: the diffusion U-Net and the quickstart's FID feature network."""
