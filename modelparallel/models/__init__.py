"""Reference models: the one shared set of models for tests, benchmarks, examples and the CLI.

Every factory returns a :class:`ModelCase`: the model, one example batch, a target, a loss and a
way to make more batches. Factories share the keyword arguments ``batch_size``, ``seed``
(``torch.manual_seed(seed)`` before building, so weights are deterministic) and ``device``.

Note [reference model conventions]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
- **Dropout is 0** by default (``dropout=0.0``), so pipelined training can be compared
  bit-for-bit with single-device training.
- **Losses are means over the batch** (over every token of every sample for language models,
  every pixel for segmentation), with the same number of terms per sample, so the mean of
  equal-sized microbatch losses equals the full-batch loss.
- **Normalisation**: models meant for parity tests (``resnet_tiny``, the ``tiny`` sizes of
  ``unet`` and ``inception``) use GroupNorm, which is per sample: BatchNorm in training mode
  normalises over the microbatch, so a pipeline with microbatches would not match single-device
  training of the full batch. ``resnet50`` and the ``base`` sizes use BatchNorm (the real
  architectures); pass ``norm="group"`` to change that.
- **device="meta"** builds the model on the meta device (no weight memory: a 1B-parameter Llama
  costs nothing); the example inputs and targets stay real CPU tensors, so the same batch can be
  fed once the model is materialised. :func:`modelparallel.tracer.trace` traces meta models with
  meta copies of the inputs.
- Hugging Face models are built from ``transformers`` configs (no download), imported inside the
  factories; torchvision is not used.

Modules, by family: :mod:`~modelparallel.models.case` (:class:`ModelCase`, losses, the
factories' helpers), :mod:`~modelparallel.models.hf` (Hugging Face GPT-2, BERT, Llama, T5),
:mod:`~modelparallel.models.cnn` (ResNet, U-Net, Inception), :mod:`~modelparallel.models.mlp`
(``SkipMLP``), :mod:`~modelparallel.models.gpt` (the parameter-sized GPT decoder) and
:mod:`~modelparallel.models.registry` (zero-argument factories, ``REGISTRY``, :func:`get`).
Every public name is importable from ``modelparallel.models`` (the CLI's
``modelparallel.models:gpt2_small`` form).

Example:
    >>> case = get("skip_mlp", batch_size=4)
    >>> case.loss().item() > 0
    True
"""

# Batch, the losses and the building blocks are public without being in ``__all__`` (as before
# the split into modules): ``models.UNet``, ``models.token_loss`` etc. stay importable.
from modelparallel.models.case import (  # noqa: F401
    Batch,
    ModelCase,
    class_loss,
    mse_loss,
    token_loss,
)
from modelparallel.models.cnn import (  # noqa: F401
    BasicBlock,
    Bottleneck,
    Inception,
    InceptionBlock,
    ResNet,
    UNet,
    inception,
    resnet50,
    resnet_tiny,
    unet,
)
from modelparallel.models.gpt import DecoderBlock, GPTDecoder, decoder_parameters, gpt_decoder
from modelparallel.models.hf import bert, encoder_decoder, gpt2, llama, t5
from modelparallel.models.mlp import SkipMLP, skip_mlp  # noqa: F401
from modelparallel.models.registry import (
    REGISTRY,
    bert_base,
    bert_large,
    bert_tiny,
    get,
    gpt2_medium,
    gpt2_small,
    gpt2_tiny,
    inception_base,
    inception_tiny,
    llama_1b,
    llama_small,
    llama_tiny,
    resnet50_model,
    t5_small,
    t5_tiny,
    unet_base,
    unet_tiny,
)

__all__ = [
    "REGISTRY",
    "DecoderBlock",
    "GPTDecoder",
    "ModelCase",
    "bert",
    "bert_base",
    "bert_large",
    "bert_tiny",
    "decoder_parameters",
    "encoder_decoder",
    "get",
    "gpt2",
    "gpt2_medium",
    "gpt2_small",
    "gpt2_tiny",
    "gpt_decoder",
    "inception",
    "inception_base",
    "inception_tiny",
    "llama",
    "llama_1b",
    "llama_small",
    "llama_tiny",
    "resnet50",
    "resnet50_model",
    "resnet_tiny",
    "skip_mlp",
    "t5",
    "t5_small",
    "t5_tiny",
    "unet",
    "unet_base",
    "unet_tiny",
]

