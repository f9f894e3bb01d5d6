"""S3T: sliced LoRA training on a frozen backbone; deletion deactivates stages."""
