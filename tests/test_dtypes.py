"""sanajax.dtypes: the one map from config dtype names to JAX dtypes, and the errors that name the field."""
import jax.numpy as jnp
import numpy as np
import pytest

from sanajax import config_utils
from sanajax.dtypes import DTYPES, dtype_from_name
from sanajax.models import dcae, sana_dit
from sanajax.models import text_encoder as te


def test_names_map_to_jnp_dtypes_with_their_itemsizes():
  assert dtype_from_name("float32") is jnp.float32
  assert dtype_from_name("bfloat16") is jnp.bfloat16
  assert dtype_from_name("float16") is jnp.float16
  assert {k: np.dtype(v).itemsize for k, v in DTYPES.items()} == {"float32": 4, "bfloat16": 2, "float16": 2}


@pytest.mark.parametrize("bad", ["fp8", "float64", "", None, ["float32"]])
def test_an_unknown_name_is_one_line_naming_the_field_and_the_allowed_names(bad):
  with pytest.raises(ValueError) as e:
    dtype_from_name(bad, "distill.teacher_dtype")
  assert str(e.value) == f"distill.teacher_dtype must be one of ['bfloat16', 'float16', 'float32'], got {bad!r}."


def test_each_model_builder_names_its_own_config_field():
  config = config_utils.load_config("tiny")
  with pytest.raises(ValueError, match=r"^model\.dtype must be one of"):
    sana_dit.build_dit(dict(config.model, dtype="fp8"))
  assert sana_dit.build_dit(dict(config.model, dtype="bfloat16")).dtype is jnp.bfloat16
  with pytest.raises(ValueError, match=r"^text\.dtype must be one of"):
    te.build_gemma2(dict(config.text, dtype="fp8"), vocab_size=64)
  assert te.build_gemma2(dict(config.text, dtype="float16"), vocab_size=64).dtype is jnp.float16
  ae = config_utils.load_config("configs/dcae_tiny.py").ae
  with pytest.raises(ValueError, match=r"^ae\.dtype must be one of"):
    dcae.build_dcae(_with(ae, dtype="fp8"))
  assert dcae.build_dcae(_with(ae, dtype="bfloat16")).dtype is jnp.bfloat16


def _with(cfg, **fields):
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.update(fields)
  return cfg
