"""The embedded testbed: procedural captioned scenes, a small CFG-trained diffusion model, and a judge."""
