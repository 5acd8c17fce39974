#!/usr/bin/env bash
# Here (where PyPI answers): download into .whl/ the wheels that the GPU image lacks and
# tasktune imports (pydantic, typer, rich and their needs, xgrammar) and pytest (the kernel tests),
# for Python 3.12 on x86_64.
# The device call then names ".whl" in `carry`; bench/gpu_all.sh installs them.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .git/info && { grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 \
  typer==0.29.2 click==8.5.1 annotated-doc==0.0.7 shellingham==1.5.4 rich==15.0.0 markdown-it-py==4.3.0 \
  mdurl==0.1.2 pygments==2.21.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 xgrammar==0.2.9 \
  apache-tvm-ffi==0.1.15.post2
du -sh .whl
