"""Data: image sources (digits, synthetic, ImageFolder, torchvision's, the user's own), transforms, the
seeded sampling an exact resume needs, and the loaders over them."""
