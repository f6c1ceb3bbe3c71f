"""Training: one loop for every strategy and every device.

* :mod:`.loop`: :func:`fit` (AdamW, cosine schedule with warm-up, label smoothing, class-weighted loss, AMP and
  channels_last on CUDA, DistributedDataParallel, early stopping, resumable epochs) and :func:`predict`;
* :mod:`.augment`: train-time augmentation presets for small sets (random resized crop, optional flip, colour jitter);
* :mod:`.loader`: images (decoded once into memory when the set is small) or cached activations -> DataLoader;
* :mod:`.distributed`: torchrun / DDP: who is rank 0, who writes files;
* :mod:`.resume`: an atomic per-epoch training state, loaded with ``weights_only=True``;
* :mod:`.strategies`: linear, staged, full, auto and the from-scratch baseline, all on :func:`fit`.

Stage 1, :mod:`.finetune`: config in, ``model.pt`` + ``finetune.json`` out; :mod:`.diagnostics` says whether transfer
helped; :mod:`.surgery` picks the part of a backbone that trains.
"""

from tledge.train.finetune import FinetuneConfig, finetune

__all__ = ["FinetuneConfig", "finetune"]
