"""Evaluating a frozen encoder: features once, then kNN votes or a linear probe trained on the cached features."""

import contextlib

import torch
import torch.nn.functional as F


def autocast_for(device: torch.device, bf16: bool):
    if bf16 and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def extract_features(encoder, images: torch.Tensor, transform, batch_size: int = 512,
                     bf16: bool = False) -> torch.Tensor:
    """Pooled features `(N, hidden_size)` (float32, on the encoder's device) of uint8 `images`, without masking:
    the encoder's `pooler_output` (class token or mean of patch tokens, as its `config.pooling` says)."""
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    features = []
    for batch in images.split(batch_size):
        with autocast_for(device, bf16):
            features.append(encoder(transform(batch.to(device, non_blocking=True))).pooler_output.float())
    encoder.train(was_training)
    return torch.cat(features)


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


def train_probe(model, train_features: torch.Tensor, train_labels: torch.Tensor, epochs: int = 90,
                batch_size: int = 256, learning_rate: float = 0.1, weight_decay: float = 0.0, seed: int = 42,
                feature_sampler=None):
    """Train the head of a linear-probe `MAEForImageClassification` (BatchNorm without affine + linear) on cached
    features of its frozen encoder, with SGD (momentum 0.9) and a cosine schedule. The encoder never runs here.

    `feature_sampler(epoch)`, when given, returns that epoch's `(features, labels)` (e.g. features of augmented
    images); otherwise every epoch uses `train_features`.
    """
    if not model.config.linear_probe:
        raise ValueError("train_probe needs a model with config.linear_probe=True.")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = train_features.device
    head = [*model.head_norm.parameters(), *model.classifier.parameters()]
    optimizer = torch.optim.SGD(head, lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, train_features.shape[0] // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    model.train()
    for epoch in range(epochs):
        features, labels = feature_sampler(epoch) if feature_sampler else (train_features, train_labels)
        labels = labels.to(device)
        order = torch.randperm(features.shape[0], generator=generator).to(device)
        for step in range(steps_per_epoch):
            index = order[step * batch_size:(step + 1) * batch_size]
            loss = F.cross_entropy(model.classify_features(features[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


@torch.no_grad()
def predict_from_features(model, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    model.eval()
    return torch.cat([model.classify_features(chunk).argmax(dim=1) for chunk in features.split(batch_size)]).cpu()
