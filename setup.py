"""Build of the native extension ``semcorr_fast._C``.

* The C++ CPU sources under ``csrc/`` are always compiled (OpenMP, ``-O3``; ``SEMCORR_CPU_ARCH``
  selects ``-march``, default ``native`` since the package is built on the machine that runs it).
* The CUDA sources (``csrc/**/*.cu``) are compiled when nvcc and a CUDA build of torch are present.
  ``SEMCORR_BUILD_CUDA=1`` forces them on (and fails loudly if nvcc is missing), ``=0`` turns them off.
  ``SEMCORR_CUDA_ARCHS`` (default ``80;90``) lists the SM targets.
* The Triton kernels live in ``kernels/`` and are installed as ``semcorr_fast.kernels``.

``semcorr info`` tells which backends an installation has.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    flag = os.environ.get("SEMCORR_BUILD_CUDA", "").strip()
    import torch
    from torch.utils import cpp_extension

    cuda_home = cpp_extension.CUDA_HOME or ("/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    have = bool(torch.version.cuda) and cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if flag == "0":
        return False, cuda_home
    if flag == "1":
        if not have:
            sys.exit("SEMCORR_BUILD_CUDA=1 but nvcc or a CUDA build of torch is missing "
                     f"(torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cuda_home!r})")
        return True, cuda_home
    return have, cuda_home


def _extensions():
    from torch.utils import cpp_extension

    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    with_cuda, cuda_home = _want_cuda()
    arch = os.environ.get("SEMCORR_CPU_ARCH", "native")
    cxx = ["-O3", "-fopenmp", "-std=c++20", "-Wno-unused-parameter"]
    if arch:
        cxx.append(f"-march={arch}")
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    include_dirs = [os.path.join(ROOT, "csrc")]
    sources = list(cpp)
    kwargs = dict(extra_link_args=["-fopenmp"])
    if with_cuda and cu:
        os.environ.setdefault("CUDA_HOME", cuda_home)
        cpp_extension.CUDA_HOME = cuda_home
        # Headers such as cusparse.h ship in the nvidia pip wheels next to torch.
        import torch
        site = os.path.dirname(os.path.dirname(torch.__file__))
        include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
        include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "*", "include")))
        archs = os.environ.get("SEMCORR_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-v"]
        for a in archs:
            a = a.strip()
            if a:
                nvcc += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        define_macros.append(("WITH_CUDA", None))
        sources += cu
        Ext = cpp_extension.CUDAExtension
        kwargs["extra_compile_args"] = {"cxx": cxx + ["-DWITH_CUDA"], "nvcc": nvcc}
    else:
        Ext = cpp_extension.CppExtension
        kwargs["extra_compile_args"] = {"cxx": cxx}
    print(f"[semcorr_fast] building _C: {len(cpp)} C++ sources, "
          f"{len(cu) if (with_cuda and cu) else 0} CUDA sources (cuda={'on' if with_cuda else 'off'})")
    return [Ext("semcorr_fast._C", sources, include_dirs=include_dirs, define_macros=define_macros, **kwargs)]


def main():
    from torch.utils.cpp_extension import BuildExtension

    setup(
        packages=["semcorr_fast", "semcorr_fast.ops", "semcorr_fast.reference", "semcorr_fast.kernels"],
        package_dir={"semcorr_fast.kernels": "kernels"},
        ext_modules=_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
