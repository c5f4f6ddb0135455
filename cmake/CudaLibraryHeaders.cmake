# Sets XMODAL_CUDA_LIBRARY_HEADERS to a folder holding the cuBLAS / cuSPARSE / cuSOLVER / cuRAND / cuFFT /
# cuDNN headers when the CUDA toolkit lacks them (empty when it has them).
#
# Why: ATen's CUDA headers include those libraries' headers. Minimal toolkits (the build machines') lack
# them; the nvidia wheels that come with torch ship them, so we borrow just those headers -- not the
# runtime's, which must stay the compiler's own.
set(XMODAL_CUDA_LIBRARY_HEADERS "")
find_path(_cusparse_h cusparse.h HINTS ${CUDAToolkit_INCLUDE_DIRS} NO_CACHE)
if(NOT _cusparse_h)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
"import glob, os, torch
root = os.path.dirname(os.path.dirname(torch.__file__))
print(';'.join(glob.glob(os.path.join(root, 'nvidia', '*', 'include')) + glob.glob(os.path.join(root, 'nvidia', '*', '*', 'include'))))"
    OUTPUT_VARIABLE _nv_include_dirs OUTPUT_STRIP_TRAILING_WHITESPACE)
  set(_lib_headers "${CMAKE_BINARY_DIR}/cuda_library_headers")
  foreach(_dir ${_nv_include_dirs})
    file(GLOB _hdrs "${_dir}/cusparse*.h" "${_dir}/cublas*.h" "${_dir}/cusolver*.h" "${_dir}/curand*.h"
                    "${_dir}/cufft*.h" "${_dir}/cudnn*.h")
    if(_hdrs)
      file(COPY ${_hdrs} DESTINATION "${_lib_headers}")
    endif()
  endforeach()
  if(NOT EXISTS "${_lib_headers}/cusparse.h")
    message(FATAL_ERROR "xmodal: cusparse.h is in neither the CUDA toolkit nor torch's nvidia wheels; "
                        "install the toolkit's library headers or build with XMODAL_CUDA=OFF")
  endif()
  set(XMODAL_CUDA_LIBRARY_HEADERS "${_lib_headers}")
  message(STATUS "xmodal: using CUDA library headers from torch's nvidia wheels")
endif()
