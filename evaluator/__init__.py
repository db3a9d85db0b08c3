"""The evaluation suite's machinery (§4.2): the measures (FID, IS, precision/recall, PSNR, SSIM), the FID
Inception network and its weight reader, and the ADM .npz batches. metrics.py is its command line."""
