# Compiles `target`'s C++ with OpenMP and links it against torch's own libgomp where torch ships one.
#
# Why: at::parallel_for is inline OpenMP code, so it is compiled into the extension; linking the system's
# libgomp as well would give the process two OpenMP runtimes and two thread pools (oversubscribed cores,
# settings such as torch.set_num_threads reaching only one of them). XMODAL_SYSTEM_GOMP=ON opts out.
function(xmodal_use_torch_openmp target)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-fopenmp>)
  file(GLOB _torch_gomp "${TORCH_LIB_DIR}/libgomp*.so*")
  if(_torch_gomp AND NOT XMODAL_SYSTEM_GOMP)
    list(GET _torch_gomp 0 _torch_gomp)
    message(STATUS "xmodal: OpenMP runtime ${_torch_gomp}")
    target_link_libraries(${target} PRIVATE "${_torch_gomp}")
  else()
    target_link_options(${target} PRIVATE -fopenmp)
  endif()
endfunction()
