"""Evaluating a frozen encoder: features once, then kNN votes or a linear probe trained on the cached features."""

import contextlib
import os
import time
from dataclasses import dataclass, field

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

    `feature_sampler(epoch)`, when given, returns that epoch's `(features, labels)` (the benchmark uses it to time
    re-running the encoder every epoch); otherwise every epoch uses `train_features`.
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


@dataclass
class FrozenEvalArguments:
    """Evaluation of a frozen encoder: linear probe and/or kNN on features computed once."""

    output_dir: str = field(default=None, metadata={"help": "Where results (and the probe model) go. Required."})
    random_init: bool = field(
        default=False,
        metadata={"help": "Evaluate a randomly initialised encoder of the same config (the baseline row). Also the "
                          "case when no --model_name_or_path is given."})
    pooling: str = field(default="cls", metadata={"help": "Features: 'cls' token or 'mean' of patch tokens."})
    linear_probe: bool = field(default=True, metadata={"help": "Train and evaluate the linear probe."})
    knn: bool = field(default=True, metadata={"help": "Evaluate weighted kNN on the same features."})
    knn_k: list[int] = field(
        default_factory=lambda: [20, 200],
        metadata={"help": "Neighbour counts for kNN; eval_accuracy is the first one's, all are recorded."})
    knn_temperature: float = field(default=0.07, metadata={"help": "Temperature of the kNN vote weights."})
    probe_epochs: int = field(default=90, metadata={"help": "Epochs of the probe head (on cached features)."})
    probe_batch_size: int = field(default=256, metadata={"help": "Batch of the probe head."})
    probe_learning_rate: float = field(default=0.1, metadata={"help": "SGD learning rate of the probe head."})
    probe_weight_decay: float = field(default=0.0, metadata={"help": "SGD weight decay of the probe head."})
    feature_batch_size: int = field(default=512, metadata={"help": "Batch of the feature extraction."})
    seed: int = field(default=42, metadata={"help": "Seed of random init and probe training."})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda if available), 'cpu', 'cuda', ..."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast for features; default on CUDA."})


def load_classifier(model_args, random_init: bool, seed: int, **config_changes):
    """`MAEForImageClassification` with a pretrained encoder (from any of our checkpoints) or a random one of the
    same config; `config_changes` (num_labels, id2label, linear_probe, pooling, ...) are applied to the config."""
    from .modeling_mae import MAEForImageClassification
    from .training import build_config

    config = build_config(model_args)
    config.update(config_changes)
    config.check()
    if model_args.model_name_or_path and not random_init:
        return MAEForImageClassification.from_pretrained(model_args.model_name_or_path, config=config)
    torch.manual_seed(seed)
    return MAEForImageClassification(config)


def run_frozen_evaluation(model_args, data_args, args: FrozenEvalArguments) -> dict:
    """Features of the frozen encoder once, then kNN and/or the linear probe on them. Returns {protocol: results}."""
    from .data import BatchTransform, load_image_splits
    from .metrics import accuracy
    from .results import encoder_fingerprint, write_results
    from .training import build_config

    if args.output_dir is None:
        raise ValueError("--output_dir is required.")
    if model_args.model_name_or_path and os.path.realpath(args.output_dir) == os.path.realpath(
            model_args.model_name_or_path):
        raise ValueError("--output_dir is the model folder itself; the probe would overwrite that model. Use a "
                         "subfolder, e.g. --output_dir <model>/probe.")
    if not (args.linear_probe or args.knn):
        raise ValueError("Nothing to do: both --linear_probe and --knn are false.")
    if args.pooling not in ("cls", "mean"):
        raise ValueError(f"--pooling must be 'cls' or 'mean', got {args.pooling!r}.")
    random_init = args.random_init or not model_args.model_name_or_path
    if not args.knn_k or min(args.knn_k) < 1:
        raise ValueError(f"--knn_k takes positive neighbour counts, got {args.knn_k}.")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16

    image_size = build_config(model_args).image_size
    train, evaluation = load_image_splits(data_args, image_size, require_labels=True)
    if args.knn and max(args.knn_k) > len(train):
        raise ValueError(f"--knn_k {max(args.knn_k)} needs at least that many training images; the training split "
                         f"has {len(train)}. Pass smaller values, e.g. --knn_k {min(20, len(train))}.")
    num_labels = int(max(train.labels.max(), evaluation.labels.max())) + 1
    names = train.class_names or [str(i) for i in range(num_labels)]
    model = load_classifier(model_args, random_init, args.seed, num_labels=num_labels,
                            id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                            linear_probe=True, pooling=args.pooling).to(device)

    plain = BatchTransform.for_model(model.config)
    started = time.perf_counter()
    train_features = extract_features(model.mae, train.images, plain, args.feature_batch_size, bf16)
    eval_features = extract_features(model.mae, evaluation.images, plain, args.feature_batch_size, bf16)
    feature_seconds = time.perf_counter() - started
    common = {
        "encoder": "random_init" if random_init else "pretrained",
        "model_name_or_path": None if random_init and not model_args.model_name_or_path
        else model_args.model_name_or_path,
        "dataset_name": data_args.dataset_name,
        "train_split": train.split,
        "eval_split": evaluation.split,
        "train_samples": len(train),
        "eval_samples": len(evaluation),
        "encoder_fingerprint": encoder_fingerprint(model.mae),
        "pooling": args.pooling,
        "seed": args.seed,
        "device": str(device),
        "bf16": bf16,
        "feature_seconds": round(feature_seconds, 2),
    }
    results = {}
    if args.knn:
        predictions = knn_predict(train_features, train.labels, eval_features, ks=tuple(args.knn_k),
                                  temperature=args.knn_temperature, num_classes=num_labels)
        by_k = {f"eval_accuracy_k{k}": accuracy(p, evaluation.labels) for k, p in predictions.items()}
        results["knn"] = dict(common, protocol="knn", eval_accuracy=by_k[f"eval_accuracy_k{args.knn_k[0]}"],
                              knn_k=list(args.knn_k), knn_temperature=args.knn_temperature, **by_k)
        write_results(args.output_dir, "knn", results["knn"])

    if args.linear_probe:
        started = time.perf_counter()
        train_probe(model, train_features, train.labels, epochs=args.probe_epochs, batch_size=args.probe_batch_size,
                    learning_rate=args.probe_learning_rate, weight_decay=args.probe_weight_decay, seed=args.seed)
        probe_seconds = time.perf_counter() - started
        results["linear_probe"] = dict(
            common, protocol="linear_probe",
            eval_accuracy=accuracy(predict_from_features(model, eval_features), evaluation.labels),
            probe_epochs=args.probe_epochs, probe_batch_size=args.probe_batch_size,
            probe_learning_rate=args.probe_learning_rate, probe_weight_decay=args.probe_weight_decay,
            probe_seconds=round(probe_seconds, 2))
        model.save_pretrained(args.output_dir)
        write_results(args.output_dir, "linear_probe", results["linear_probe"])
    return results
