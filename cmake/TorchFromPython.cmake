# Finds the torch that will import the extension by asking its Python, and sets TORCH_INCLUDE_DIRS,
# TORCH_LIB_DIR, TORCH_CXX11_ABI, TORCH_CUDA_VERSION and TORCH_VERSION.
#
# Why not find_package(Torch): torch's CMake config probes for a GPU and for libnvrtc, which the minimal
# CUDA toolkits on the build machines lack, and fails there. We only need headers and a few libraries.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
"import os, torch
from torch.utils import cpp_extension as ce
print(';'.join(ce.include_paths()))
print(os.path.join(os.path.dirname(torch.__file__), 'lib'))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(torch.version.cuda or '')
print(torch.__version__)"
  OUTPUT_VARIABLE _torch_info OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _torch_rc)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "xmodal: could not import torch with ${Python_EXECUTABLE}; install torch first "
                      "and build with --no-build-isolation")
endif()
string(REPLACE "\n" ";" _torch_info "${_torch_info}")
list(GET _torch_info -4 TORCH_LIB_DIR)
list(GET _torch_info -3 TORCH_CXX11_ABI)
list(GET _torch_info -2 TORCH_CUDA_VERSION)
list(GET _torch_info -1 TORCH_VERSION)
list(LENGTH _torch_info _n)
math(EXPR _n_inc "${_n} - 4")
list(SUBLIST _torch_info 0 ${_n_inc} TORCH_INCLUDE_DIRS)
message(STATUS "xmodal: torch ${TORCH_VERSION} (CUDA '${TORCH_CUDA_VERSION}') at ${TORCH_LIB_DIR}")

# Links `target` against torch's own libraries (CUDA ones too when `with_cuda`), by path.
function(xmodal_link_torch target with_cuda)
  set(_libs c10 torch_cpu torch torch_python)
  if(with_cuda)
    list(APPEND _libs c10_cuda torch_cuda)
  endif()
  foreach(_lib ${_libs})
    find_library(_path_${_lib} NAMES ${_lib} PATHS "${TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
    target_link_libraries(${target} PRIVATE "${_path_${_lib}}")
  endforeach()
endfunction()
