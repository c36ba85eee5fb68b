"""Write what the legacy stack holds (run at the end of provision.sh, Python 3 in the root).

Output JSON: debian (every installed package -> version), pinned (the pinned package
list), blas/lapack (update-alternatives targets), python2 (interpreter and wheel versions),
python3 (caffe, numpy, protobuf), snapshot (the dated mirror or null).
"""
import json
import os
import subprocess
import sys


def main(recipe_dir, out_path):
    def lines(name):
        with open(os.path.join(recipe_dir, name)) as f:
            return [s.strip() for s in f if s.strip() and not s.lstrip().startswith("#")]

    dpkg = subprocess.run(["dpkg-query", "-W", "-f", "${Package}\t${Version}\n"],
                          check=True, capture_output=True, text=True).stdout
    py2 = subprocess.run(
        ["python2.7", "-c",
         "import json, sys, numpy, scipy, skimage, PIL, pywt, networkx, six, decorator, pip;"
         "print(json.dumps(dict(python=sys.version.split()[0], numpy=numpy.__version__,"
         " scipy=scipy.__version__, skimage=skimage.__version__, Pillow=PIL.PILLOW_VERSION,"
         " PyWavelets=pywt.__version__, networkx=networkx.__version__, six=six.__version__,"
         " decorator=decorator.__version__, pip=pip.__version__)))"],
        check=True, capture_output=True, text=True).stdout
    import caffe
    import google.protobuf
    import numpy
    stack = {
        "debian": dict(line.split("\t", 1) for line in dpkg.splitlines()),
        "pinned_debian": lines("debian-packages.txt"),
        "pinned_wheels": [s.split()[0] for s in lines("requirements-py2.txt")],
        "blas": os.path.realpath("/usr/lib/x86_64-linux-gnu/libblas.so.3"),
        "lapack": os.path.realpath("/usr/lib/x86_64-linux-gnu/liblapack.so.3"),
        "python2": json.loads(py2),
        "python3": {"python": sys.version.split()[0], "caffe": caffe.__version__,
                    "numpy": numpy.__version__, "protobuf": google.protobuf.__version__},
        "snapshot": os.environ.get("PORTING_DEBIAN_SNAPSHOT") or None,
    }
    with open(out_path, "w") as f:
        json.dump(stack, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
