"""Write the bentofile `make image` builds with: bentofile.yaml plus what this build chose.

Recorded in the Bento (bento.yaml, and the image's environment): the model tag as
TAILORGPT_MODEL and every TAILORGPT_* engine setting (but the API key) set in this environment;
the base image when one is given; the index of this machine's pip configuration when it has one.

usage: python scripts/bentofile.py OUT MODEL_TAG BASE_IMAGE INDEX_URL [EXTRA_INDEX_URL...]
(empty strings for a base image or an index: BentoML's default)
"""

import os
import sys

import yaml

out, model, base_image, index_url, *extra_index_urls = sys.argv[1:]
with open("bentofile.yaml") as f:
    conf = yaml.safe_load(f)

settings = {e["name"]: e["value"] for e in conf.get("envs", [])}
# An API key is a secret: it comes from the deployment (a Secret), never from the image.
settings.update(
    (k, v) for k, v in os.environ.items() if k.startswith("TAILORGPT_") and k != "TAILORGPT_API_KEY"
)
settings["TAILORGPT_MODEL"] = model
conf["envs"] = [{"name": k, "value": v} for k, v in sorted(settings.items())]
if base_image:
    conf["docker"]["base_image"] = base_image
if index_url:
    conf["python"]["index_url"] = index_url
if extra_index_urls:
    conf["python"]["extra_index_url"] = extra_index_urls

with open(out, "w") as f:
    yaml.safe_dump(conf, f, sort_keys=False)
