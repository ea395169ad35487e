"""The one error a bad config raises: one line that starts with the field's name."""


class ConfigError(ValueError):
  """A config value that cannot work; the message starts with the field's name."""


def check(ok: bool, field: str, problem: str):
  if not ok:
    raise ConfigError(f'{field}: {problem}')


def one_of(value, choices, field: str):
  check(value in choices, field, f'unknown name {value!r}; choose one of {sorted(choices)}')


def positive_int(value, field: str):
  check(isinstance(value, int) and not isinstance(value, bool) and value > 0, field,
        f'must be a positive integer, got {value!r}')


def non_negative(value, field: str):
  check(isinstance(value, (int, float)) and value >= 0, field, f'must be >= 0, got {value!r}')
