# shellcheck shell=bash
# Helpers shared by the launch scripts: option parsing, errors, quoting, printing and running
# commands. Source it; it defines functions and a few globals and runs nothing.
#
# Kept to what bash 3.2 (macOS's /bin/bash) understands, since the TPU scripts are often run from
# a laptop: no associative arrays, no `wait -n`, and empty arrays expanded as ${a[@]+"${a[@]}"}.

# Set by --dry-run (every script has it): print the commands without running them.
DRY_RUN=0

# Options the calling script accepts, without the leading "--" and spelled with underscores
# (--dry-run and --dry_run are the same option). The script sets both before calling parse_args
# and gives every OPT_<name> its default first.
VALUE_OPTS=()
FLAG_OPTS=()

# Filled by parse_args: the words that are not options, and everything after a lone "--".
# shellcheck disable=SC2034
POSITIONAL=()
# shellcheck disable=SC2034
PASSTHROUGH=()

# err MESSAGE: one line "error: MESSAGE" on stderr.
err() {
  printf 'error: %s\n' "$*" >&2
}

# usage_error MESSAGE: a bad or missing argument; exit status 2.
usage_error() {
  err "$*"
  exit 2
}

# die MESSAGE: something failed while running; exit status 1.
die() {
  err "$*"
  exit 1
}

# note MESSAGE: say what the script is doing (stdout, prefixed "# " so it can't be taken for a
# command).
note() {
  printf '# %s\n' "$*"
}

# require VALUE WHAT: exit 2 with "error: missing WHAT" when VALUE is empty.
require() {
  if [[ -z $1 ]]; then
    usage_error "missing $2"
  fi
}

# require_int VALUE OPTION MIN: VALUE must be a whole number >= MIN.
require_int() {
  if [[ ! $1 =~ ^[0-9]+$ ]] || (($1 < $3)); then
    usage_error "$2 must be a whole number >= $3, got '$1'"
  fi
}

# quote WORD: WORD quoted for a POSIX shell; words made only of safe characters stay as they are,
# and in --name=VALUE or NAME=VALUE only VALUE is quoted (--command='ls -l', XLA_FLAGS='a b').
quote() {
  local word=$1 prefix="" sq="'" escaped="'\\''"
  if [[ $word =~ ^(--[A-Za-z0-9_.-]+|[A-Za-z_][A-Za-z0-9_]*)= ]]; then
    prefix=${BASH_REMATCH[0]}
    word=${word#"$prefix"}
  fi
  if [[ -n $word && $word != *[!A-Za-z0-9_./:=@%+,-]* ]]; then
    printf '%s%s' "$prefix" "$word"
  else
    printf "%s'%s'" "$prefix" "${word//"$sq"/$escaped}"
  fi
}

# join_quoted WORD...: the words quoted and joined by spaces: one shell command line.
join_quoted() {
  local line="" word
  for word in "$@"; do
    line+="${line:+ }$(quote "$word")"
  done
  printf '%s' "$line"
}

# print_cmd WORD...: print the command as "+ cmd args", quoted so it can be pasted into a shell.
print_cmd() {
  printf '+ %s\n' "$(join_quoted "$@")"
}

# run WORD...: print the command, then run it unless --dry-run.
run() {
  print_cmd "$@"
  if ((!DRY_RUN)); then
    "$@"
  fi
}

# in_list WORD LIST...: whether WORD is one of LIST.
in_list() {
  local word=$1 item
  shift
  for item in "$@"; do
    if [[ $item == "$word" ]]; then
      return 0
    fi
  done
  return 1
}

# parse_args ARG...: parse --name=value / --name value (VALUE_OPTS) and --name (FLAG_OPTS) into
# OPT_<name>; -h/--help prints usage (the script's function) and exits 0; words that are not
# options go to POSITIONAL; everything after "--" goes to PASSTHROUGH unchanged.
parse_args() {
  local arg name value has_value
  POSITIONAL=()
  PASSTHROUGH=()
  while (($#)); do
    arg=$1
    shift
    case $arg in
      --)
        # shellcheck disable=SC2034
        PASSTHROUGH=("$@")
        break
        ;;
      -h | --help)
        usage
        exit 0
        ;;
      --?*)
        name=${arg#--}
        has_value=0
        value=""
        if [[ $name == *=* ]]; then
          value=${name#*=}
          name=${name%%=*}
          has_value=1
        fi
        name=${name//-/_}
        if in_list "$name" ${VALUE_OPTS[@]+"${VALUE_OPTS[@]}"}; then
          if ((!has_value)); then
            if (($# == 0)) || [[ $1 == --* ]]; then
              usage_error "--$name needs a value"
            fi
            value=$1
            shift
          fi
          printf -v "OPT_$name" '%s' "$value"
        elif in_list "$name" ${FLAG_OPTS[@]+"${FLAG_OPTS[@]}"}; then
          if ((has_value)); then
            usage_error "--$name takes no value"
          fi
          printf -v "OPT_$name" '%s' 1
        else
          usage_error "unknown option $arg (see --help)"
        fi
        ;;
      -?*)
        usage_error "unknown option $arg (see --help)"
        ;;
      *)
        POSITIONAL+=("$arg")
        ;;
    esac
  done
}

# need_command NAME WHY: exit 1 unless NAME is on PATH (skipped under --dry-run).
need_command() {
  if ((!DRY_RUN)) && ! command -v "$1" >/dev/null 2>&1; then
    die "$1 not found on PATH ($2)"
  fi
}
