#!/bin/sh
# gokiq's image entrypoint: refuse to start while any variable still holds a placeholder from
# docker/.env.example ("change-me..."), then run the command (bridge, worker or Flower).
# Copied as-is, Compose would otherwise start with secrets everyone can read in this repository.
set -eu
placeholders=$(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*change-me.*/\1/p' | sort -u | tr '\n' ' ')
if [ -n "$placeholders" ]; then
  echo "gokiq: refusing to start: ${placeholders}still hold the change-me placeholder of" \
    "docker/.env.example; put real secrets in docker/.env (e.g. openssl rand -hex 32)" >&2
  exit 78
fi
exec "$@"
