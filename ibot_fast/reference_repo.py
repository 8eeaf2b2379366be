"""The real reference: a user's bytedance/ibot checkout, loaded at run time.

    ref = load_reference("/path/to/ibot")      # or $IBOT_REFERENCE_REPO
    ref.iBOTLoss, ref.iBOTHead, ref.MultiCropWrapper, ref.models.vit_small, ref.utils.clip_gradients
    step = ReferenceTrainStep(ref, args, iters_per_epoch=10)   # args: ibot_fast.config.parse_args
    terms = step(images, masks, epoch, it)

Nothing of the checkout is copied into ibot_fast: its ``utils``, ``models`` (ViT, heads) and
``main_ibot`` (``iBOTLoss``) are imported from the given path, so the parity tests
(``tests/test_reference_repo.py``) and the ``reference`` benchmark variant
(``bench/bench_step.py``) run the reference's own code.

Why the import needs care, and what is done about it:

* The checkout imports packages a CPU machine usually lacks (``torchvision``, ``tensorboardX``,
  ``timm``'s registry and layers, ``munkres``, ``sklearn``). A finder placed *last* on
  ``sys.meta_path`` during the import answers only for those names and only when the real
  package cannot be found, with a stub module: ``timm``'s ``register_model`` is the identity
  (the reference decorates its Swin factories with it); ``timm.models.layers`` gets
  ``DropPath``, ``trunc_normal_`` and ``to_2tuple`` (ibot_fast's, the same computations) so
  the reference's Swin can be built; every other name is a placeholder class that raises when
  used. Installed packages are used as they are.
* ``loader`` (the dataset, on torchvision's ImageFolder) and ``evaluation.*`` (``eval_pred``,
  on munkres) are replaced by such stubs outright: the step is fed crops and masks, and
  ``eval_pred`` runs only at the end of an epoch.
* The checkout's top-level names (``utils``, ``models``, ``loader``, ``main_ibot``,
  ``evaluation``) collide with anything else of those names, so whatever held them in
  ``sys.modules`` is set aside during the import and put back afterwards; the checkout's
  modules, the stubs and the ``sys.path`` entry are removed again, and no ``__pycache__`` is
  written into the checkout. The returned namespace
  holds the module objects; one load per path is cached.
* ``iBOTLoss.update_center`` calls ``dist.all_reduce`` and ``dist.get_world_size``
  unconditionally. The loaded ``main_ibot`` gets a ``dist`` that is ``torch.distributed``
  when a process group is initialised and a one-process world otherwise (all-reduce is the
  identity, world size 1), so no process group is created, let alone left behind (ibot_fast's
  Trainer behaves differently when one exists).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import math
import os
import sys
import types
import warnings
from typing import Optional

import torch
import torch.distributed as torch_dist

# imported by the checkout, often missing on a CPU machine: stubbed only when not installed
_OPTIONAL_ROOTS = ("torchvision", "tensorboardX", "timm", "munkres", "sklearn")
# the checkout's own top-level names
_OWN_ROOTS = ("utils", "models", "loader", "main_ibot", "evaluation")
# the checkout's modules the step never runs: always stubbed
_ALWAYS_STUBBED = ("loader", "evaluation", "evaluation.unsupervised",
                   "evaluation.unsupervised.unsup_cls")
_REQUIRED_FILES = ("main_ibot.py", "utils.py", "models/__init__.py",
                   "models/vision_transformer.py", "models/head.py")

_CACHE: dict[str, types.SimpleNamespace] = {}


# ------------------------------------------------------------------------------- stubs
class _PlaceholderMeta(type):
    """Classes standing in for what a stub module does not have: attribute access gives
    further placeholders (``transforms.Compose``), subclassing works (``loader.py``'s
    ``ImageFolderMask(ImageFolder)``), instantiating or calling one raises."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(
            f"{cls.__qualname__} is a stub made by ibot_fast.reference_repo because the package "
            "is not installed (or, for the checkout's loader/evaluation modules, not needed "
            "for a training step); install it to use this part of the reference")


def _placeholder(qualname: str) -> type:
    cls = _PlaceholderMeta(qualname.rsplit(".", 1)[-1], (), {})
    cls.__qualname__ = qualname
    return cls


class _StubModule(types.ModuleType):
    """A module whose every missing attribute is a placeholder class."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


def _make_stub(name: str) -> _StubModule:
    mod = _StubModule(name)
    mod.__path__ = []  # a package: `from torchvision import datasets` imports a stub child
    mod.__file__ = None
    if name == "timm.models.registry":
        mod.register_model = lambda fn: fn  # a decorator at import time of models/swin_*.py
    if name == "timm.models.layers":
        # what the reference's Swin builds with; the same computations as timm's (the
        # inverse-CDF trunc_normal_ of timm <= 0.4, per-sample drop path), so the reference's
        # Swin can be built without timm installed
        from ibot_fast.models.vit import DropPath, trunc_normal_
        mod.DropPath, mod.trunc_normal_ = DropPath, trunc_normal_
        mod.to_2tuple = lambda x: tuple(x) if isinstance(x, (list, tuple)) else (x, x)
    return mod


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return _make_stub(spec.name)

    def exec_module(self, module):
        pass


class _StubFinder(importlib.abc.MetaPathFinder):
    """Last on sys.meta_path: reached only when no real finder has the module."""

    def __init__(self):
        self.stubbed: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".", 1)[0] not in _OPTIONAL_ROOTS:
            return None
        self.stubbed.append(fullname)
        return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)


# --------------------------------------------------------------------------- torch.distributed
class _OneProcessDist(types.ModuleType):
    """``torch.distributed`` as the reference's loss sees it: the real module while a process
    group is initialised; otherwise a world of one process (``all_reduce`` leaves the tensor as
    it is, ``get_world_size`` is 1), which is what the collectives compute for one rank."""

    def __init__(self):
        super().__init__("ibot_fast.reference_repo.dist")

    @staticmethod
    def _live() -> bool:
        return torch_dist.is_available() and torch_dist.is_initialized()

    def all_reduce(self, tensor, *args, **kwargs):
        if self._live():
            return torch_dist.all_reduce(tensor, *args, **kwargs)
        return None

    def get_world_size(self, *args, **kwargs):
        return torch_dist.get_world_size(*args, **kwargs) if self._live() else 1

    def get_rank(self, *args, **kwargs):
        return torch_dist.get_rank(*args, **kwargs) if self._live() else 0

    def __getattr__(self, name):
        return getattr(torch_dist, name)


# ------------------------------------------------------------------------------- loading
def _is_checkout_module(mod, path: str) -> bool:
    if isinstance(mod, _StubModule):  # (torch.ops answers any attribute: no getattr test)
        return True
    f = getattr(mod, "__file__", None)
    return bool(f) and os.path.realpath(f).startswith(path + os.sep)


@contextlib.contextmanager
def _isolated_import(path: str):
    """sys.modules / sys.path / sys.meta_path as they were before, whatever happens inside."""
    own = lambda name: name.split(".", 1)[0] in _OWN_ROOTS  # noqa: E731
    set_aside = {n: sys.modules.pop(n) for n in list(sys.modules) if own(n)}
    before = set(sys.modules)
    had_cache = path in sys.path_importer_cache
    finder = _StubFinder()
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # no __pycache__ left in the user's checkout
    sys.path.insert(0, path)
    sys.meta_path.append(finder)
    for name in _ALWAYS_STUBBED:
        sys.modules[name] = _make_stub(name)
    try:
        with warnings.catch_warnings():
            # the checkout's `x is '*'` comparisons (Swin) warn when compiled
            warnings.simplefilter("ignore", SyntaxWarning)
            yield finder
    finally:
        sys.dont_write_bytecode = dont_write
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)
        if path in sys.path:
            sys.path.remove(path)
        if not had_cache:
            sys.path_importer_cache.pop(path, None)
        for name in list(sys.modules):
            if name in before and not own(name):
                continue
            mod = sys.modules[name]
            # the checkout's modules, every stub, and any own-root name imported meanwhile;
            # real packages pulled in on the way (numpy, PIL, ...) stay imported
            if own(name) or _is_checkout_module(mod, path) or name in finder.stubbed:
                del sys.modules[name]
        sys.modules.update(set_aside)


def _check_checkout(path: str) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"reference path {path!r} is not a directory; point IBOT_REFERENCE_REPO "
                         "(or the path argument) at a bytedance/ibot checkout")
    missing = [f for f in _REQUIRED_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise ValueError(f"reference path {path!r} is not a bytedance/ibot checkout: missing "
                         f"{', '.join(missing)}")


def load_reference(path: Optional[str] = None) -> types.SimpleNamespace:
    """Import the reference's ``utils``, ``models`` and ``main_ibot`` from a checkout.

    ``path`` defaults to ``$IBOT_REFERENCE_REPO``. Returns a namespace with the modules
    (``utils``, ``models``, ``vision_transformer``, ``head``, ``main_ibot``), the classes used
    most (``iBOTLoss``, ``iBOTHead``, ``MultiCropWrapper``, ``VisionTransformer``), ``path`` and
    ``stubbed`` (the missing packages that were replaced by stubs). Cached per real path.
    Raises ``ValueError`` when the path is not an iBOT checkout.
    """
    if path is None:
        path = os.environ.get("IBOT_REFERENCE_REPO")
        if not path:
            raise ValueError("path is None and IBOT_REFERENCE_REPO is not set; pass the path "
                             "of a bytedance/ibot checkout")
    path = os.path.realpath(os.fspath(path))
    if path in _CACHE:
        return _CACHE[path]
    _check_checkout(path)
    with _isolated_import(path) as finder:
        try:
            utils = importlib.import_module("utils")
            models = importlib.import_module("models")
            vit = importlib.import_module("models.vision_transformer")
            head = importlib.import_module("models.head")
            main_ibot = importlib.import_module("main_ibot")
        except Exception as err:
            raise ValueError(f"importing the reference checkout {path!r} failed: "
                             f"{type(err).__name__}: {err}") from err
        for mod, attr in ((main_ibot, "iBOTLoss"), (head, "iBOTHead"),
                          (utils, "MultiCropWrapper"), (utils, "clip_gradients"),
                          (vit, "VisionTransformer")):
            if not hasattr(mod, attr) or not os.path.realpath(mod.__file__).startswith(path):
                raise ValueError(f"reference path {path!r}: {mod.__name__} has no {attr}; is "
                                 "it a bytedance/ibot checkout?")
        stubbed = sorted({n.split(".", 1)[0] for n in finder.stubbed})
    main_ibot.dist = _OneProcessDist()
    ns = types.SimpleNamespace(
        path=path, utils=utils, models=models, vision_transformer=vit, head=head,
        main_ibot=main_ibot, iBOTLoss=main_ibot.iBOTLoss, iBOTHead=head.iBOTHead,
        MultiCropWrapper=utils.MultiCropWrapper, VisionTransformer=vit.VisionTransformer,
        stubbed=stubbed)
    _CACHE[path] = ns
    return ns


# ------------------------------------------------------------------------------- the step
def reference_backbone(ref, arch: str, patch_size: int, img_size: int, **kwargs):
    """The reference's ViT for ``arch``: its own factory where it has one (vit_tiny ... vit_large,
    deit_* aliases), else (``vit_nano``, ours only) its ``VisionTransformer`` class with our
    factory's widths. ``img_size``: the reference hard-codes 224 (position table 14x14 for
    /16); ibot_fast's ``--global_crops_size`` sets it, so equal weights fit both."""
    from ibot_fast.models.vit import ARCHS

    if arch.startswith("swin"):
        return reference_swin(ref, arch, img_size, **kwargs)
    name = arch.replace("deit", "vit", 1) if arch.startswith("deit") else arch
    kwargs = dict(patch_size=patch_size, img_size=[img_size], **kwargs)
    if name in getattr(ref.models, "__dict__", {}) and name.startswith("vit"):
        return ref.models.__dict__[name](**kwargs)
    if name not in ARCHS:
        raise ValueError(f"arch {arch!r}: neither the reference nor ibot_fast has it")
    with torch.device("meta"):
        ours = ARCHS[name](patch_size=patch_size)
    blk = ours.blocks[0]
    return ref.VisionTransformer(
        embed_dim=ours.embed_dim, depth=len(ours.blocks), num_heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / ours.embed_dim, qkv_bias=True, **kwargs)


def reference_swin(ref, arch: str, img_size: int, window_size: int = 7, **kwargs):
    """The reference's Swin for ``arch``: its factory (swin_tiny ... swin_large) where it has
    one, else (``swin_nano``, ours only) its ``SwinTransformer`` class with our widths.
    ``img_size`` sizes the stage windows (the reference builds for 224)."""
    from ibot_fast.models.swin import SWIN_CONFIGS

    kwargs = dict(window_size=window_size, img_size=img_size, **kwargs)
    if arch in getattr(ref.models, "__dict__", {}):
        return ref.models.__dict__[arch](**kwargs)
    if arch not in SWIN_CONFIGS:
        raise ValueError(f"arch {arch!r}: neither the reference nor ibot_fast has it")
    cfg = SWIN_CONFIGS[arch]
    return ref.models.SwinTransformer(embed_dim=cfg["embed_dim"], depths=list(cfg["depths"]),
                                      num_heads=list(cfg["num_heads"]), mlp_ratio=4,
                                      qkv_bias=True, **kwargs)


class ReferenceTrainStep:
    """The reference's networks, loss, optimiser and schedules, built as ``main_ibot.train_ibot``
    builds them from an ibot_fast ``args`` namespace, and one iteration of ``train_one_epoch``'s
    loop body (``__call__``), restated without DDP and without ``.cuda()``.

    Differences from ``train_ibot``, all forced by running in one process on any device:
    no DDP wrapper (the step is the same for one rank); ``args.global_crops_size`` and the head
    widths come from ``args`` (the reference hard-codes 224, 2048, 256); ``precision`` fp64
    (verification) casts the networks and the loss' centres to float64; ``bf16`` autocasts
    without a GradScaler (the reference knows fp16 only); ``acc`` compares the [CLS] argmaxes of
    this rank (what ``concat_all_gather`` gives with one rank).
    """

    def __init__(self, ref, args, iters_per_epoch: int, device="cpu", world_size: int = 1):
        if iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
        self.ref, self.args = ref, args
        self.device = torch.device(device)
        precision = self.precision = args.precision
        self.dtype = torch.float64 if precision == "fp64" else torch.float32
        u = ref.utils

        # ---- networks (train_ibot: "building student and teacher networks") ----
        # Swin: window_size as main_ibot passes it; drop_path_rate from args (main_ibot leaves
        # the factory's default, 0.1 for swin_tiny, 0.2 for the others)
        swin = dict(window_size=args.window_size) if args.arch.startswith("swin") else {}
        student = reference_backbone(ref, args.arch, args.patch_size, args.global_crops_size,
                                     drop_path_rate=args.drop_path, return_all_tokens=True,
                                     masked_im_modeling=args.use_masked_im_modeling, **swin)
        teacher = reference_backbone(ref, args.arch, args.patch_size, args.global_crops_size,
                                     return_all_tokens=True,
                                     **(dict(swin, drop_path_rate=0.0) if swin else {}))
        embed_dim = student.num_features if swin else student.embed_dim
        head_kw = dict(hidden_dim=args.head_hidden_dim, bottleneck_dim=args.head_bottleneck_dim,
                       # ibot_fast's head: the reference's defaults (no norm, GELU)
                       norm=None, act="gelu")
        with _quiet_weight_norm():
            s_head = ref.iBOTHead(embed_dim, args.out_dim, patch_out_dim=args.patch_out_dim,
                                  norm_last_layer=args.norm_last_layer,
                                  shared_head=args.shared_head, **head_kw)
            t_head = ref.iBOTHead(embed_dim, args.out_dim, patch_out_dim=args.patch_out_dim,
                                  shared_head=args.shared_head_teacher, **head_kw)
        self.student = ref.MultiCropWrapper(student, s_head).to(self.device, self.dtype)
        self.teacher = ref.MultiCropWrapper(teacher, t_head).to(self.device, self.dtype)
        self.teacher.load_state_dict(self.student.state_dict(), strict=False)
        for p in self.teacher.parameters():
            p.requires_grad = False

        # ---- loss ----
        same_dim = args.shared_head or args.shared_head_teacher
        self.ibot_loss = ref.iBOTLoss(
            args.out_dim, args.out_dim if same_dim else args.patch_out_dim,
            args.global_crops_number, args.local_crops_number, args.warmup_teacher_temp,
            args.teacher_temp, args.warmup_teacher_patch_temp, args.teacher_patch_temp,
            args.warmup_teacher_temp_epochs, args.epochs, lambda1=args.lambda1,
            lambda2=args.lambda2, mim_start_epoch=args.pred_start_epoch,
        ).to(self.device, self.dtype)

        # ---- optimiser, scaler, schedules ----
        groups = u.get_params_groups(self.student)
        if args.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups)
        elif args.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=0, momentum=0.9)
        else:
            raise ValueError(f"optimizer {args.optimizer!r}: adamw or sgd")
        self.fp16_scaler = (torch.amp.GradScaler(self.device.type)
                            if precision == "fp16" else None)
        n = iters_per_epoch
        self.iters_per_epoch = n
        self.lr_schedule = u.cosine_scheduler(
            args.lr * (args.batch_size_per_gpu * world_size) / 256.0, args.min_lr, args.epochs,
            n, warmup_epochs=args.warmup_epochs)
        self.wd_schedule = u.cosine_scheduler(args.weight_decay, args.weight_decay_end,
                                              args.epochs, n)
        self.momentum_schedule = u.cosine_scheduler(args.momentum_teacher, 1, args.epochs, n)

        # ---- common params (train_one_epoch's prologue), paired by position ----
        names_q, params_q = zip(*self.student.named_parameters())
        names_k, params_k = zip(*self.teacher.named_parameters())
        common = set(names_q) & set(names_k)
        self.params_q = [p for nm, p in zip(names_q, params_q) if nm in common]
        self.params_k = [p for nm, p in zip(names_k, params_k) if nm in common]
        self.metrics: dict = {}

    def load_weights(self, student_state: dict, teacher_state: dict) -> None:
        """Start from given weights (ibot_fast's state-dict names are the reference's)."""
        from ibot_fast.convert import normalize_keys

        self.student.load_state_dict(normalize_keys(student_state))
        self.teacher.load_state_dict(normalize_keys(teacher_state))

    def autocast(self):
        if self.precision in ("fp16", "bf16"):
            dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def __call__(self, images, masks, epoch: int, it: int) -> dict:
        """``train_one_epoch``'s loop body for global iteration ``it``. ``images``: list of
        crops (global first), ``masks``: one bool [B, h, w] per crop, or at least one per
        global crop (only those are read). Returns the loss terms (0-dim tensors) and ``acc``;
        ``self.metrics`` gets the logged floats (the reference's ``.item()`` calls)."""
        args, ng, u = self.args, self.args.global_crops_number, self.ref.utils
        student, teacher, optimizer = self.student, self.teacher, self.optimizer
        for i, param_group in enumerate(optimizer.param_groups):
            param_group["lr"] = self.lr_schedule[it]
            if i == 0:  # only the first group is regularised
                param_group["weight_decay"] = self.wd_schedule[it]
        images = [im.to(self.device, self.dtype, non_blocking=True) for im in images]
        masks = [m.to(self.device, non_blocking=True) for m in masks]

        with self.autocast():
            teacher_output = teacher(images[:ng])
            student_output = student(images[:ng], mask=masks[:ng])
            student.backbone.masked_im_modeling = False
            student_local_cls = student(images[ng:])[0] if len(images) > ng else None
            student.backbone.masked_im_modeling = args.use_masked_im_modeling
            all_loss = self.ibot_loss(student_output, teacher_output, student_local_cls, masks,
                                      epoch)
            loss = all_loss.pop("loss")

        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"reference step: loss is {loss.item()}, stopping")

        # acc: teacher crop 0 vs student crop 1 [CLS] argmax (concat_all_gather of one rank)
        pred1 = teacher_output[0].chunk(ng)[0].max(dim=1)[1]
        pred2 = student_output[0].chunk(ng)[1].max(dim=1)[1] if ng > 1 else pred1
        acc = (pred1 == pred2).sum() / pred1.size(0)

        optimizer.zero_grad()
        if self.fp16_scaler is None:
            loss.backward()
            if args.clip_grad:
                u.clip_gradients(student, args.clip_grad)
            u.cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
            optimizer.step()
        else:
            self.fp16_scaler.scale(loss).backward()
            if args.clip_grad:
                self.fp16_scaler.unscale_(optimizer)
                u.clip_gradients(student, args.clip_grad)
            u.cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
            self.fp16_scaler.step(optimizer)
            self.fp16_scaler.update()

        with torch.no_grad():  # EMA: the reference's Python loop over the common parameters
            m = self.momentum_schedule[it]
            for param_q, param_k in zip(self.params_q, self.params_k):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.metrics = {"loss": loss.item(), **{k: v.item() for k, v in all_loss.items()},
                        "lr": optimizer.param_groups[0]["lr"],
                        "wd": optimizer.param_groups[0]["weight_decay"], "acc": float(acc)}
        return {"loss": loss.detach(), **{k: v.detach() for k, v in all_loss.items()},
                "acc": acc}


@contextlib.contextmanager
def _quiet_weight_norm():
    """The reference's heads use ``nn.utils.weight_norm``, deprecated (FutureWarning) in
    current torch; the numbers are the same, the warning is noise in every test."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
        yield
