#!/bin/sh
# infra/render.sh FILE: print an infra/ manifest with its placeholders filled from the environment, for kubectl:
#   TOKENTRIM_IMAGE     the tokentrim image, pinned by digest (REGISTRY/REPO@sha256:<64 hex>; README: build, push)
#   KUBECTL_IMAGE       the nightly submitter's image (kubectl + sh), pinned by digest
#   TOKENTRIM_ROLE_ARN  the IAM role the tokentrim-ray ServiceAccount assumes (IRSA)
# Only the placeholders FILE holds are needed; an image given by a tag alone is refused.
set -eu
file=${1:?usage: infra/render.sh FILE}
script=""
for name in TOKENTRIM_IMAGE KUBECTL_IMAGE TOKENTRIM_ROLE_ARN; do
  grep -q "\${$name}" "$file" || continue
  eval "value=\${$name:-}"
  if [ -z "$value" ]; then
    echo "render.sh: $file needs $name" >&2
    exit 2
  fi
  case "$name" in
    *_IMAGE)
      if ! printf '%s\n' "$value" | grep -Eq '^[a-z0-9][a-z0-9._/:-]*@sha256:[0-9a-f]{64}$'; then
        echo "render.sh: $name=$value is not pinned by digest (NAME@sha256:<64 hex digits>)" >&2
        exit 2
      fi ;;
  esac
  script="$script;s|\${$name}|$value|g"
done
sed "${script#;}" "$file"
