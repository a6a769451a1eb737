"""The foundation every layer may use: user errors, tensor checksums, safe torch files, instantiating the
user's own classes. Imports nothing from finetune above it."""
