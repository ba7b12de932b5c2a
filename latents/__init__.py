"""The latent cache: every clip's VAE latents, first-frame conditioning and CLIP tokens, encoded once."""
