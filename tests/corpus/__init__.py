"""A corpus of BatchNorm2d layers written in the styles people write in public code.

Each file is standalone (imports only torch), loadable as a suite target by path, e.g.
``tests/corpus/older.py:OlderBatchNorm2d``. Every layer is 2-d (N, C, H, W), channel
axis 1, and differs from ``torch.nn.BatchNorm2d`` ONLY by what :data:`CORPUS` lists:

* ``conventions``: known numerical conventions it follows instead of torch's (names
  from :mod:`bnspec.conventions`, plus ``stats_by_grad_mode`` and
  ``running_stats_in_training``);
* ``contract_gaps``: pieces of torch's contract it lacks. Constructor keywords
  ("eps", "momentum", "affine", "track_running_stats", "device", "dtype", "bias"),
  value variants ("momentum=None", "affine=False", "track_running_stats=False",
  "bias=False"; a missing keyword lists its variant too), instance pieces
  ("weight parameter", "bias parameter", "running_mean buffer", "running_var buffer",
  "num_batches_tracked buffer", "reset_running_stats", "reset_parameters",
  "state_dict", "load_state_dict", "train/eval"). Every layer is an ``nn.Module``, so
  none lacks state_dict / load_state_dict / train/eval; but a layer without the
  counter has one key fewer than torch's state_dict, so torch's keys and a strict load
  from torch fail for it as a consequence of "num_batches_tracked buffer";
* ``layout_bug``: wrong values for non-contiguous (channels_last, sliced, transposed)
  input while contiguous input is right;
* ``default_differences``: constructor defaults that differ from torch's
  (``eps=1e-5, momentum=0.1``), as {keyword: default}.

``python tests/corpus/check_corpus.py`` demonstrates every claim against torch.
"""

_NO_FACTORY = {"device", "dtype", "bias", "bias=False"}
_NO_SWITCHES = {"affine", "affine=False", "track_running_stats", "track_running_stats=False"}
_NO_RESETS = {"reset_running_stats", "reset_parameters"}
_MINIMAL = _NO_FACTORY | _NO_SWITCHES | _NO_RESETS | {"momentum=None", "num_batches_tracked buffer"}

CORPUS = {
    "lecture.py:LectureBatchNorm2d": {
        "style": "lecture from scratch (makemore-style lesson)",
        "conventions": {"unbiased_normalization"},
        "contract_gaps": set(_MINIMAL),
        "layout_bug": False,
        "default_differences": {},
    },
    "textbook.py:TextbookBatchNorm2d": {
        "style": "textbook function plus module (d2l-style)",
        "conventions": {"stats_by_grad_mode", "momentum_on_old", "biased_running_var"},
        "contract_gaps": set(_MINIMAL),
        "layout_bug": False,
        # 0.9 on the old value is torch's 0.1 on the new one
        "default_differences": {"momentum": 0.9},
    },
    "blog.py:BlogBatchNorm2d": {
        "style": "blog post, torch-like with register_buffer",
        "conventions": {"one_pass_variance"},
        "contract_gaps": _NO_FACTORY | _NO_RESETS,
        "layout_bug": False,
        "default_differences": {},
    },
    "interview.py:InterviewBatchNorm2d": {
        "style": "interview notes",
        "conventions": {"biased_running_var"},
        "contract_gaps": set(_MINIMAL),
        "layout_bug": False,
        "default_differences": {},
    },
    "frozen.py:FrozenBatchNorm2d": {
        "style": "frozen inference-only layer (detection-library style)",
        "conventions": {"running_stats_in_training"},
        "contract_gaps": _MINIMAL | {"momentum", "weight parameter", "bias parameter"},
        "layout_bug": False,
        "default_differences": {},
    },
    "older.py:OlderBatchNorm2d": {
        "style": "correct layer from before torch's keyword-only bias",
        "conventions": set(),
        "contract_gaps": {"bias", "bias=False"},
        "layout_bug": False,
        "default_differences": {},
    },
    "nocounter.py:NoCounterBatchNorm2d": {
        "style": "correct torch-style layer without the counter",
        "conventions": set(),
        "contract_gaps": {"num_batches_tracked buffer", "momentum=None"},
        "layout_bug": False,
        "default_differences": {},
    },
    "layout.py:ContiguousMemoryBatchNorm2d": {
        "style": "full-contract layer that reads memory as contiguous NCHW",
        "conventions": set(),
        "contract_gaps": set(),
        "layout_bug": True,
        "default_differences": {},
    },
    "keras_style.py:KerasStyleBatchNorm2d": {
        "style": "port of Keras BatchNormalization",
        "conventions": {"momentum_on_old", "biased_running_var"},
        "contract_gaps": set(_MINIMAL),
        "layout_bug": False,
        "default_differences": {"eps": 1e-3, "momentum": 0.99},
    },
}
