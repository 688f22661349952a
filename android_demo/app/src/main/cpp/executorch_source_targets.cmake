# ExecuTorch installed from a source build (the Android build of README.md) exports bare target
# names; runtime_ops/ and this project link the executorch::* names of the pip wheel's package.
# Map them (only those not already defined). The kernel and backend archives carry their own
# whole-archive link options, which keeps their static registration objects.
function(kvq_alias name)
  if(TARGET ${name})
    return()
  endif()
  set(_libs "")
  foreach(t IN LISTS ARGN)
    if(NOT TARGET ${t})
      message(FATAL_ERROR "ExecuTorch target '${t}' (for ${name}) is not in the install at ${executorch_DIR}: rebuild ExecuTorch "
                          "with the options of android_demo/README.md (XNNPACK, optimized + quantized kernels, module/tensor/data loader)")
    endif()
    list(APPEND _libs ${t})
  endforeach()
  add_library(${name} INTERFACE IMPORTED GLOBAL)
  set_target_properties(${name} PROPERTIES INTERFACE_LINK_LIBRARIES "${_libs}")
endfunction()

kvq_alias(executorch::runtime executorch executorch_core extension_module_static extension_tensor extension_data_loader
          extension_flat_tensor)
kvq_alias(executorch::threadpool extension_threadpool)  # carries ET_USE_THREADPOOL
kvq_alias(executorch::kernels_optimized optimized_native_cpu_ops_lib)
kvq_alias(executorch::kernels_quantized quantized_ops_lib)
kvq_alias(executorch::backend_xnnpack xnnpack_backend)
