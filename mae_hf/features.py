"""What pretraining's kNN monitor and the evaluation protocols share beside the frozen-feature pass
(`probes.encode_frozen`): image batches in order, and weighted kNN votes on features."""

import torch
import torch.nn.functional as F

from .data import sequential_batches
from .transfer import to_device


def image_batches(images, batch_size: int, device: torch.device):
    """(uint8 canvases on `device`, their sizes on the host or None), `batch_size` at a time and in order, of a
    uint8 tensor of images or of an `ImageData` split (a streamed one is read by its DataLoader workers meanwhile)."""
    batches = ((batch, None) for batch in images.split(batch_size)) if isinstance(images, torch.Tensor) \
        else sequential_batches(images, batch_size, pin_memory=device.type == "cuda")
    for batch, sizes in batches:
        yield to_device(batch, device), sizes


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, ks=(20, 200),
                temperature: float = 0.07, num_classes: int | None = None, chunk_size: int = 1024) -> dict:
    """Weighted kNN (Wu et al. 2018, as in DINO): cosine similarity, each of the k nearest neighbours votes for its
    label with weight exp(similarity / temperature). Returns {k: predictions}; k is capped at the bank size."""
    num_classes = int(bank_labels.max()) + 1 if num_classes is None else num_classes
    bank = F.normalize(bank.float(), dim=1)
    bank_labels = bank_labels.to(bank.device)
    k_max = min(max(ks), bank.shape[0])
    predictions = {k: [] for k in ks}
    for query in F.normalize(queries.float().to(bank.device), dim=1).split(chunk_size):
        similarity, index = (query @ bank.T).topk(k_max, dim=1)
        weights, labels = (similarity / temperature).exp(), bank_labels[index]
        for k in ks:
            votes = torch.zeros(query.shape[0], num_classes, device=bank.device)
            votes.scatter_add_(1, labels[:, :k], weights[:, :k])
            predictions[k].append(votes.argmax(dim=1))
    return {k: torch.cat(chunks).cpu() for k, chunks in predictions.items()}
