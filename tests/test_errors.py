"""What a user sees when something is wrong: one line naming the problem and the fix, exit
status 2, no traceback (unless --verbose), and nothing written to the workdir.

Flag parsing is checked in this process on a fresh set of flags defined like main.py's; a few
cases then run `python -m instdisc_jax.main` end to end in child processes, all at once. (More
config and data errors, and that they leave no files and compile nothing, are checked in this
process by test_workdir.py.)
"""

import os
import subprocess

from absl import flags
from ml_collections import config_flags
import pytest
import tiny_run

from instdisc_jax import data
from instdisc_jax import flag_errors
from instdisc_jax import train
from instdisc_jax.errors import DataError
from instdisc_jax.errors import UserError

# ml_collections loads config files with a deprecated importlib call.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def parse(*args, config=tiny_run.TINY_CONFIG):
  """Parses `--config=<config> <args>` as main.py's flags would be."""
  flag_values = flags.FlagValues()
  flags.DEFINE_integer("num_processes", None, "", flag_values=flag_values)
  argv = ["main.py", f"--config={config}", *args]
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
  flag_errors.parse(argv, flag_values)
  return flag_values


@pytest.mark.parametrize("args, message", [
    (["--config.batchsize=16"], "config.batchsize is not a config field; did you mean "
     "'batch_size'? (from --config.batchsize=16)"),
    (["--config.augment.flipp=True"], "config.augment.flipp is not a config field; did you "
     "mean 'flip'? (from --config.augment.flipp=True)"),
    (["--config.augment.zzz=1"], "config.augment.zzz is not a config field (the fields of "
     "config.augment: color_jitter, crop_scale_min, flip, grayscale_prob) (from "
     "--config.augment.zzz=1)"),
    (["--config.augmnt.flip=True"], "config.augmnt is not a config field; did you mean "
     "'augment'? (from --config.augmnt.flip=True)"),
    (["--config.batch_size=abc"], "config.batch_size='abc': must be an integer"),
    (["--config.temperature=warm"], "config.temperature='warm': must be a number"),
    (["--config.augment.flip=maybe"], "config.augment.flip='maybe': must be True or False"),
    (["--num_processes=two"], "--num_processes='two': must be an integer"),
    (["--bogus=1"], "Unknown command line flag 'bogus'; see --helpfull"),
])
def test_flag_errors_are_one_line_naming_the_field(args, message):
  with pytest.raises(UserError) as error:
    parse(*args)
  assert str(error.value) == message


def test_unknown_field_without_a_close_name_lists_the_fields():
  with pytest.raises(UserError) as error:
    parse("--config.nonexistent=1")
  assert str(error.value).startswith(
      "config.nonexistent is not a config field (the fields of config: augment, bank_dtype, ")
  assert str(error.value).endswith("z_mode, z_momentum) (from --config.nonexistent=1)")


@pytest.mark.parametrize("args", [[], ["--config.seed=3"]])
def test_missing_config_file(args):
  with pytest.raises(UserError) as error:
    parse(*args, config="configs/nonexistent.py")
  assert str(error.value) == ("--config=configs/nonexistent.py: cannot load the config file "
                              "([Errno 2] No such file or directory: 'configs/nonexistent.py')")


def test_config_file_that_fails_names_the_error(tmp_path):
  path = tmp_path / "broken.py"
  path.write_text("def get_config():\n  return 1 / 0\n")
  with pytest.raises(UserError) as error:
    parse(config=str(path))
  assert str(error.value) == (f"--config={path}: cannot load the config file "
                              "(ZeroDivisionError: division by zero)")


def test_good_flags_parse():
  assert parse("--config.batch_size=32", "--config.augment.flip=True").config.batch_size == 32


# -- end to end ----------------------------------------------------------------------------------


def cli_cases(npz, tfds_dir):
  """name -> (flags after --config and --workdir, expected exit status, last line of stderr)."""
  return {
      "flag error": (["--config.batchsize=16"], 2,
                     "error: config.batchsize is not a config field; did you mean "
                     "'batch_size'? (from --config.batchsize=16)"),
      "invalid value": ([f"--config.dataset=npz:{npz}", "--config.temperature=-1"], 2,
                        "error: config.temperature=-1.0: must be > 0"),
      "unprepared tfds dataset": (
          ["--config.dataset=fashion_mnist", f"--config.data_dir={tfds_dir}"], 2,
          f"error: dataset fashion_mnist is not prepared in {tfds_dir}: run `python -m "
          f"instdisc_jax.data.prepare --dataset=fashion_mnist --data_dir={tfds_dir}` (it reads "
          "the Debian package: sudo apt-get install -y dataset-fashion-mnist)"),
      "verbose": ([f"--config.dataset=npz:{npz}", "--config.temperature=-1", "--verbose"], 1,
                  "instdisc_jax.errors.ConfigError: config.temperature=-1.0: must be > 0"),
  }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """Runs every case concurrently: name -> (result, its workdir)."""
  root = tmp_path_factory.mktemp("errors")
  npz = tiny_run.write_npz(root / "tiny.npz")
  cases = cli_cases(npz, str(root / "tfds"))
  workdirs = {name: root / name.replace(" ", "_") for name in cases}
  processes = {name: subprocess.Popen(tiny_run.main_command(workdirs[name], *flags_),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=tiny_run.environment(), cwd=tiny_run.REPO)
               for name, (flags_, _, _) in cases.items()}
  results = {}
  for name, process in processes.items():
    _, stderr = process.communicate(timeout=300)
    results[name] = (process.returncode, stderr, workdirs[name])
  return results, cases


@pytest.mark.slow  # starts a training process per case
@pytest.mark.parametrize("name", list(cli_cases("", "")))
def test_main_reports_one_line_and_writes_nothing(finished, name):
  results, cases = finished
  status, stderr, workdir = results[name]
  _, expected_status, expected = cases[name]
  assert status == expected_status, stderr
  assert stderr.splitlines()[-1] == expected
  if name == "verbose":
    assert "Traceback (most recent call last)" in stderr
  else:
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [expected]
  assert not os.path.exists(workdir)


# -- data errors, in this process ----------------------------------------------------------------


def test_unprepared_imagenet_says_how_to_prepare_it_from_the_manual_download(tmp_path):
  with pytest.raises(DataError) as error:
    data.load_dataset("imagenet2012", "train", data_dir=str(tmp_path))
  message = str(error.value)
  assert "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in message
  assert (f"`python -m instdisc_jax.data.prepare --dataset=imagenet2012 --data_dir={tmp_path} "
          "--manual_dir=DIR`") in message


@pytest.mark.parametrize("shape, expected", [
    ((16, 16, 2), "`images` has shape (64, 16, 16, 2), expected (N, H, W) or (N, H, W, C) with "
     "C 1 or 3"),
    ((16, 16, 3, 1), "`images` has shape (64, 16, 16, 3, 1), expected (N, H, W) or "
     "(N, H, W, C) with C 1 or 3"),
])
def test_wrong_image_shape_is_a_clear_error_before_anything_is_written(tmp_path, shape,
                                                                       expected):
  npz = tiny_run.write_npz(tmp_path / "bad.npz", shape=shape)
  workdir = tmp_path / "run"
  with pytest.raises(DataError) as error:
    train.train_and_evaluate(tiny_run.config(npz), str(workdir))
  assert str(error.value) == f"npz:{npz}: {expected}"
  assert not workdir.exists()


def test_user_errors_are_one_line():
  with pytest.raises(ValueError, match="one line"):
    UserError("two\nlines")
