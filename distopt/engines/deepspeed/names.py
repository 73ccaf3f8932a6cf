"""Names the adapter's modules share: the tag on the groups it builds, the DeepSpeed releases it
supports, how a config names an optimizer, and the converted checkpoint's format."""

ADAPTER = "deepspeed"
# DeepSpeed releases the adapter is tested with (tests/distributed/test_deepspeed.py, on CPU). Older
# ones are refused before anything is built; newer ones are tried with a warning.
DEEPSPEED_MIN, DEEPSPEED_TESTED_MAX = (0, 19, 6), (0, 19, 8)
DEEPSPEED_RANGE = "deepspeed>=0.19.6,<=0.19.8"
CONFIG_PREFIX = "distopt."
CONFIG_LABEL = CONFIG_PREFIX + "{}"  # how a DeepSpeed config names an optimizer
FULL_FORMAT = "distopt-deepspeed-full"
CONVERT_HINT = ("convert it once with `python -m distopt.deepspeed convert {ckpt} OUT.pt` and resume with "
                "`distopt.deepspeed.load_full_state(engine, 'OUT.pt')` in place of engine.load_checkpoint")
