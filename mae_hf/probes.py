"""Frozen-feature protocols (`FROZEN_PROTOCOLS`, read by the runner, the tables, reproduce.py and the model card; see
docs/evaluation.md), trained on what one pass of the frozen encoder leaves (`encode_frozen`), and their saved heads
(`<protocol>_head.safetensors` + `<protocol>_head.json`; `load_head` rebuilds one)."""

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .features import image_batches, knn_predict
from .inputs import read_json_object, write_json
from .metrics import accuracy
from .modeling_mae import follow_umask
from .precision import autocast_for
from .transfer import synchronize, to_device

TOKEN_DTYPE = torch.float16  # numpy has float16 (not bfloat16), so one dtype serves memory and memmap caches
MEMORY_CACHE_LIMIT = 2 * 2 ** 30  # bytes of cached tokens kept in host memory under --token_cache auto


class TokenCache:
    """Patch tokens `(images, patches, hidden)` as float16: a tensor (host or GPU memory) or a np.memmap file."""

    def __init__(self, shape: tuple, device: torch.device, path: str | None = None):
        self.shape, self.path, self.storage = tuple(shape), path, "memory" if path is None else "disk"
        if path is None:
            self.tensor, self.array = torch.empty(self.shape, dtype=TOKEN_DTYPE, device=device), None
        else:
            self.tensor, self.array = None, np.memmap(path, dtype=np.float16, mode="w+", shape=self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def write(self, start: int, tokens: torch.Tensor) -> None:
        if self.tensor is not None:
            self.tensor[start:start + len(tokens)] = tokens.to(self.tensor.device, TOKEN_DTYPE)
        else:
            self.array[start:start + len(tokens)] = tokens.to("cpu", TOKEN_DTYPE).numpy()

    def read(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Rows `index` (a host tensor; ascending reads are fastest from disk), float16 on `device`."""
        if self.tensor is not None:
            return to_device(self.tensor[to_device(index, self.tensor.device)], device)
        return to_device(torch.from_numpy(self.array[index.numpy()]), device)

    def close(self) -> None:
        """Free the memory, or delete the file."""
        self.tensor = self.array = None  # the file's mapping goes with its last reference
        if self.path is not None and os.path.exists(self.path):
            os.remove(self.path)


def token_cache_for(num_images: int, config, device: torch.device, choice: str, folder: str, name: str) -> TokenCache:
    """A cache for one split's patch tokens. `choice` 'memory', 'disk' or 'auto': on a GPU in its memory while the
    cache takes at most half of the free memory, on a CPU in host memory up to `MEMORY_CACHE_LIMIT`, else on disk."""
    shape = (num_images, config.num_patches, config.hidden_size)
    if choice == "auto":
        room = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else MEMORY_CACHE_LIMIT
        choice = "memory" if math.prod(shape) * 2 <= room else "disk"
    if choice == "memory":
        return TokenCache(shape, device)
    os.makedirs(folder, exist_ok=True)
    return TokenCache(shape, device, os.path.join(folder, f"attentive_probe_tokens_{name}.f16"))


@torch.no_grad()
def encode_frozen(encoder, images, transform, batch_size: int = 512, bf16: bool = False,
                  feature_blocks: int = 1, token_cache: TokenCache | None = None, progress: str | None = None):
    """One unmasked pass of the frozen encoder over uint8 `images` (a tensor or an `ImageData` split). Returns the
    `pooler_output` features `(N, hidden)`, float32 on the encoder's device, and the multi-block features `(N, 2 *
    feature_blocks * hidden)`, float32 on the host (None for one block); writes the last block's patch tokens into
    `token_cache` when given. `progress`: the label of a progress bar over the images (None: no bar)."""
    from tqdm.auto import tqdm

    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    pooled, multiblock = [], None
    start = 0
    with tqdm(total=len(images), desc=progress, unit="img", disable=progress is None) as bar:
        for canvases, sizes in image_batches(images, batch_size, device):
            batch = transform(canvases, sizes)
            with autocast_for(device, bf16):
                output = encoder(batch, output_hidden_states=feature_blocks > 1, return_dict=True)
                pooled.append(output.pooler_output.float())
                if feature_blocks > 1:  # class token and mean patch token of each of the last blocks, earliest first
                    normed = [encoder.norm(block) for block in output.hidden_states[-feature_blocks:]]
                    features = torch.cat([part for block in normed for part in (block[:, 0], block[:, 1:].mean(dim=1))],
                                         dim=1).float()
                    if multiblock is None:
                        multiblock = torch.empty((len(images), features.shape[1]), pin_memory=device.type == "cuda")
                    multiblock[start:start + len(batch)].copy_(features, non_blocking=True)
            if token_cache is not None:
                token_cache.write(start, output.last_hidden_state[:, 1:])
            start += len(batch)
            bar.update(len(batch))
    encoder.train(was_training)
    synchronize(device)  # the non-blocking copies into `multiblock` done: a clock read next times the whole pass
    return torch.cat(pooled), multiblock


def train_probe(model, train_features: torch.Tensor, train_labels: torch.Tensor, **recipe):
    """Train a linear-probe `MAEForImageClassification`'s head on cached features (`recipe`: `fit_head`'s)."""
    if not model.config.linear_probe:
        raise ValueError("train_probe needs a model with config.linear_probe=True.")
    head = [*model.head_norm.parameters(), *model.classifier.parameters()]
    return fit_head(model, model.classify_features, head, train_features, train_labels, **recipe)


def fit_head(module, classify, parameters, train_features: torch.Tensor, train_labels: torch.Tensor,
             epochs: int = 90, batch_size: int = 256, learning_rate: float = 0.1, weight_decay: float = 0.0,
             seed: int = 42, feature_sampler=None, progress: bool = False, device=None):
    """The linear probe's loop: `parameters` trained with SGD (momentum 0.9, cosine) on `classify(features)`'s logits
    over shuffled batches, on `device` (default: the features'). Returns `module` in eval mode. `feature_sampler(epoch)`
    gives that epoch's `(features, labels)` when given (the benchmark times re-running the encoder)."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = train_features.device if device is None else torch.device(device)
    optimizer = torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, train_features.shape[0] // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    module.train()
    for epoch in tqdm(range(epochs), desc="Probe head", unit="epoch", disable=not progress):
        features, labels = feature_sampler(epoch) if feature_sampler else (train_features, train_labels)
        labels = to_device(labels, features.device)
        order = to_device(torch.randperm(features.shape[0], generator=generator), features.device)
        for step in range(steps_per_epoch):
            index = order[step * batch_size:(step + 1) * batch_size]
            batch, batch_labels = to_device(features[index], device), to_device(labels[index], device)
            loss = F.cross_entropy(classify(batch), batch_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return module.eval()


class LinearHead(nn.Module):
    """The linear probe's head on any feature vector: BatchNorm without affine parameters, then linear."""

    def __init__(self, feature_size: int, num_labels: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(feature_size, affine=False, eps=1e-6)
        self.classifier = nn.Linear(feature_size, num_labels)
        nn.init.trunc_normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(features))


def check_heads(hidden_size: int, num_heads: int) -> None:
    if hidden_size % num_heads:
        raise ValueError(f"--attentive_heads {num_heads} must divide the encoder's hidden size {hidden_size}.")


class AttentiveProbe(nn.Module):
    """Over frozen patch tokens `(batch, patches, hidden)`: one learned query attends (multi-head) over the normalised
    tokens; the pooled vector (query + projected attention output) goes through a LayerNorm to the classifier."""

    def __init__(self, hidden_size: int, num_labels: int, num_heads: int = 4):
        super().__init__()
        check_heads(hidden_size, num_heads)
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.token_norm = nn.LayerNorm(hidden_size)
        self.key_value = nn.Linear(hidden_size, 2 * hidden_size)
        self.projection = nn.Linear(hidden_size, hidden_size)
        self.pooled_norm = nn.LayerNorm(hidden_size)
        self.classifier = nn.Linear(hidden_size, num_labels)
        nn.init.trunc_normal_(self.query, std=0.02)
        for linear in (self.key_value, self.projection, self.classifier):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.token_norm(tokens.to(self.query.dtype))
        key, value = rearrange(self.key_value(tokens), "b n (two h d) -> two b h n d", two=2, h=self.num_heads)
        query = rearrange(self.query, "one q (h d) -> one h q d", h=self.num_heads).expand(len(tokens), -1, -1, -1)
        attended = rearrange(F.scaled_dot_product_attention(query, key, value), "b h q d -> b q (h d)")
        return (self.query + self.projection(attended))[:, 0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooled_norm(self.pool(tokens)))


HEADS = {"linear_probe_multiblock": LinearHead, "attentive_probe": AttentiveProbe}


def head_files(protocol: str) -> tuple[str, str]:
    return f"{protocol}_head.safetensors", f"{protocol}_head.json"


def save_head(head: nn.Module, folder: str, protocol: str, init: dict, info: dict) -> None:
    """`<protocol>_head.safetensors` (state dict) + `<protocol>_head.json` ({"protocol", "init": kwargs, **info})."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    weights, record = (os.path.join(folder, name) for name in head_files(protocol))
    save_file({key: value.contiguous().cpu() for key, value in head.state_dict().items()}, weights)
    follow_umask(weights)
    write_json(record, {"protocol": protocol, "init": init, **info}, sort_keys=True)


def load_head(folder: str, protocol: str) -> tuple[nn.Module, dict]:
    """The head saved by `save_head` (in eval mode) and its JSON record."""
    from safetensors.torch import load_file

    if protocol not in HEADS:
        raise ValueError(f"No saved head for protocol {protocol!r}; heads exist for {sorted(HEADS)}.")
    weights, path = (os.path.join(folder, name) for name in head_files(protocol))
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file; is {folder} the output folder of a {protocol} run?")
    info = read_json_object(path, f"the record of a saved {protocol} head")
    head = HEADS[protocol](**info["init"])
    head.load_state_dict(load_file(weights))
    return head.eval(), info


def fit_head_kwargs(args) -> dict:
    """`fit_head`'s settings from the --probe_* flags (`PROBE_RECIPE`), --seed and --disable_tqdm."""
    return {**{name.removeprefix("probe_"): getattr(args, name) for name in PROBE_RECIPE}, "seed": args.seed,
            "progress": not args.disable_tqdm}


def train_multiblock_probe(train_features, train_labels, num_labels: int, args, device=None) -> LinearHead:
    """The linear probe's recipe (--probe_* flags) on multi-block features; each batch is copied to `device`."""
    torch.manual_seed(args.seed)  # the head's initial weights: from the seed, whatever ran before in this process
    device = train_features.device if device is None else device
    head = LinearHead(train_features.shape[1], num_labels).to(device)
    return fit_head(head, head, list(head.parameters()), train_features, train_labels, device=device,
                    **fit_head_kwargs(args))


def train_attentive_probe(tokens: TokenCache, labels: torch.Tensor, num_labels: int, hidden_size: int, args,
                          device: torch.device, bf16: bool) -> AttentiveProbe:
    """AdamW (weight decay on the linear weights only), 5 % linear warmup then cosine, on the cached tokens."""
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    probe = AttentiveProbe(hidden_size, num_labels, args.attentive_heads).to(device)
    decayed = [module.weight for module in probe.modules() if isinstance(module, nn.Linear)]
    others = [p for p in probe.parameters() if all(p is not q for q in decayed)]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": args.attentive_weight_decay},
                                   {"params": others, "weight_decay": 0.0}], lr=args.attentive_learning_rate)
    batch_size = min(args.attentive_batch_size, len(tokens))
    steps_per_epoch = len(tokens) // batch_size
    total = args.attentive_epochs * steps_per_epoch
    warmup = max(1, total // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))))
    labels = to_device(labels, device)
    probe.train()
    for _ in range(args.attentive_epochs):
        order = torch.randperm(len(tokens), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * batch_size:(step + 1) * batch_size].sort().values  # ascending: sequential reads
            with autocast_for(device, bf16):
                logits = probe(tokens.read(index, device))
            loss = F.cross_entropy(logits.float(), labels[to_device(index, device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return probe.eval()


@torch.no_grad()
def predict_tokens(probe: AttentiveProbe, tokens: TokenCache, device: torch.device, bf16: bool,
                   batch_size: int = 1024) -> torch.Tensor:
    probe.eval()
    predictions = []
    for start in range(0, len(tokens), batch_size):
        index = torch.arange(start, min(start + batch_size, len(tokens)))
        with autocast_for(device, bf16):
            predictions.append(probe(tokens.read(index, device)).argmax(dim=1))
    return torch.cat(predictions).cpu()  # read once, at the end


@torch.no_grad()
def predict_features(head: nn.Module, features: torch.Tensor, batch_size: int = 4096, classify=None) -> torch.Tensor:
    """Predicted classes of cached features (host or device); `classify` (default: the head) gives the logits."""
    head.eval()
    classify, device = classify or head, next(head.parameters()).device
    return torch.cat([classify(to_device(chunk, device)).argmax(dim=1) for chunk in features.split(batch_size)]).cpu()


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, round(time.perf_counter() - started, 2)


@dataclass
class FrozenInputs:
    """What the encoder pass leaves for the protocols: the classifier around the encoder (its head untrained), both
    splits, and per split ("train", "eval") the pooled and multi-block features and the patch-token caches."""

    model: nn.Module
    train: object
    evaluation: object
    pooled: dict
    blocks: dict
    tokens: dict
    device: torch.device
    bf16: bool
    encoder_fingerprint: str

    @property
    def num_labels(self) -> int:
        return self.model.config.num_labels


@dataclass(frozen=True)
class FrozenProtocol:
    """One frozen-feature protocol; `args` are `FrozenEvalArguments`."""

    name: str
    title: str | None  # its row in the tables; None: kNN's rows are titled per k
    switch: str  # the flag that turns it off
    wanted: Callable  # wanted(args)
    needs: str  # what the encoder pass keeps for it: "pooled", "blocks" or "tokens"
    fit: Callable  # fit(inputs, args) trains, evaluates and saves it; returns its own result fields
    saves: tuple[str, ...] = ()  # the files it writes beside its result file
    reproduce_flags: tuple[str, ...] | None = None  # in reproduce.py's mae_probes step; None: the default probe step
    # check(args, config, train) refuses its flags before any work: with the config (train None), then with the
    # training split before any image is decoded
    check: Callable = lambda args, config, train: None


# the flags of each head's recipe, recorded in its result file
PROBE_RECIPE = ("probe_epochs", "probe_batch_size", "probe_learning_rate", "probe_weight_decay")
ATTENTIVE_RECIPE = ("attentive_heads", "attentive_epochs", "attentive_batch_size", "attentive_learning_rate",
                    "attentive_weight_decay")


def fit_linear_probe(inputs: FrozenInputs, args) -> dict:
    """The classifier's own head on the pooled features; saved as an `MAEForImageClassification`."""
    model = inputs.model
    _, seconds = timed(train_probe, model, inputs.pooled["train"], inputs.train.labels, **fit_head_kwargs(args))
    predictions = predict_features(model, inputs.pooled["eval"], classify=model.classify_features)
    model.save_pretrained(args.output_dir)
    return dict(eval_accuracy=accuracy(predictions, inputs.evaluation.labels), pooling=args.pooling,
                probe_seconds=seconds, **{name: getattr(args, name) for name in PROBE_RECIPE})


def fit_multiblock_probe(inputs: FrozenInputs, args) -> dict:
    train_blocks = inputs.blocks["train"]
    head, seconds = timed(train_multiblock_probe, train_blocks, inputs.train.labels, inputs.num_labels, args,
                          inputs.device)
    features = (f"class token + mean patch token of each of the last {args.feature_blocks} blocks, after the "
                "encoder's final LayerNorm, concatenated")
    save_head(head, args.output_dir, "linear_probe_multiblock",
              init={"feature_size": train_blocks.shape[1], "num_labels": inputs.num_labels},
              info={"feature_blocks": args.feature_blocks, "features": features,
                    "id2label": inputs.model.config.id2label, "encoder_fingerprint": inputs.encoder_fingerprint})
    return dict(eval_accuracy=accuracy(predict_features(head, inputs.blocks["eval"]), inputs.evaluation.labels),
                feature_blocks=args.feature_blocks, features=features, feature_size=train_blocks.shape[1],
                probe_seconds=seconds, **{name: getattr(args, name) for name in PROBE_RECIPE})


def fit_attentive_probe(inputs: FrozenInputs, args) -> dict:
    hidden_size = inputs.model.config.hidden_size
    head, seconds = timed(train_attentive_probe, inputs.tokens["train"], inputs.train.labels, inputs.num_labels,
                          hidden_size, args, inputs.device, inputs.bf16)
    features = "patch tokens of the last block, after the encoder's final LayerNorm, cached as float16"
    save_head(head, args.output_dir, "attentive_probe",
              init={"hidden_size": hidden_size, "num_labels": inputs.num_labels, "num_heads": args.attentive_heads},
              info={"features": features, "id2label": inputs.model.config.id2label,
                    "encoder_fingerprint": inputs.encoder_fingerprint})
    predictions = predict_tokens(head, inputs.tokens["eval"], inputs.device, inputs.bf16)
    return dict(eval_accuracy=accuracy(predictions, inputs.evaluation.labels), features=features,
                token_cache=inputs.tokens["train"].storage, probe_seconds=seconds,
                **{name: getattr(args, name) for name in ATTENTIVE_RECIPE})


def check_knn(args, config, train) -> None:  # --knn_k's values are checked with the other flags, kNN on or off
    if train is not None and max(args.knn_k) > len(train):
        raise ValueError(f"--knn_k {max(args.knn_k)} needs at least that many training images; the training "
                         f"split has {len(train)}. Pass smaller values, e.g. --knn_k {min(20, len(train))}.")


def fit_knn(inputs: FrozenInputs, args) -> dict:
    """Weighted kNN votes of the training features for each --knn_k; eval_accuracy is the first k's."""
    predictions = knn_predict(inputs.pooled["train"], inputs.train.labels, inputs.pooled["eval"],
                              ks=tuple(args.knn_k), temperature=args.knn_temperature, num_classes=inputs.num_labels)
    by_k = {f"eval_accuracy_k{k}": accuracy(p, inputs.evaluation.labels) for k, p in predictions.items()}
    return dict(pooling=args.pooling, eval_accuracy=by_k[f"eval_accuracy_k{args.knn_k[0]}"], knn_k=list(args.knn_k),
                knn_temperature=args.knn_temperature, **by_k)


# the linear probe's saved classifier (save_pretrained: weights, config, processor, the code files beside them)
PROBE_MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "configuration_mae.py",
                     "modeling_mae.py")

FROZEN_PROTOCOLS = (  # table order: the rows of compare's table and the order they run in
    FrozenProtocol("linear_probe", "Linear probe (frozen encoder, BatchNorm + linear head)", "linear_probe",
                   lambda args: args.linear_probe and args.feature_blocks == 1, "pooled", fit_linear_probe,
                   saves=PROBE_MODEL_FILES),
    FrozenProtocol("linear_probe_multiblock",
                   "Multi-block linear probe (class + mean patch token of the last blocks)", "linear_probe",
                   lambda args: args.linear_probe and args.feature_blocks > 1, "blocks", fit_multiblock_probe,
                   saves=head_files("linear_probe_multiblock"),
                   reproduce_flags=("--feature_blocks", "{feature_blocks}")),
    FrozenProtocol("attentive_probe",
                   "Attentive probe (cross-attention pooling of frozen patch tokens + linear head)", "attentive_probe",
                   lambda args: args.attentive_probe, "tokens", fit_attentive_probe,
                   saves=head_files("attentive_probe"), reproduce_flags=("--attentive_probe", "true"),
                   check=lambda args, config, train: check_heads(config.hidden_size, args.attentive_heads)),
    FrozenProtocol("knn", None, "knn", lambda args: args.knn, "pooled", fit_knn, check=check_knn),
)
