# The include rules of src/ (docs/style.md layout: includes only point down), checked on the sources:
#   cmake -DSRC_DIR=<repo>/src -P cmake/layering_check.cmake
# Every #include "..." (and <...> naming a project header) of every source file under SRC_DIR is
# resolved (beside the including file first, then under SRC_DIR) to the layer it belongs to, and
# must be one the including file's layer may use. Separately, CUDA headers may be included only in
# src/backend/cuda/ and src/dist/nccl_* (the rest of the code builds without the toolkit). Each
# violation is printed as file:line with the rule it breaks; the script fails when there is any.
# ctest runs it as layering_check on src/ and, as layering_check_detects, on a fixture tree with
# planted violations (tests/layering/), which must be reported exactly.
cmake_minimum_required(VERSION 3.22)
if(NOT SRC_DIR OR NOT IS_DIRECTORY "${SRC_DIR}")
  message(FATAL_ERROR "layering: pass -DSRC_DIR=<the src folder> (got '${SRC_DIR}')")
endif()
get_filename_component(SRC_DIR "${SRC_DIR}" ABSOLUTE)

# Layers: a file's layer is its top folder under src/, except within src/backend: cpu/ and cuda/
# are layers of their own, and backend_registry.* (make_backend: the one place that knows the
# concrete backends) is the layer above them. A layer may always include its own headers.
set(layers core backend backend_cpu backend_cuda backend_registry model data io dist train eval serve cli)
# Allowed dependencies (what each layer may include besides itself):
set(allow_core)                      # the standard library and fmt only
set(allow_backend core)              # the interface (backend.h, op_args.h) and op_validation.*
set(allow_backend_cpu backend core)
set(allow_backend_cuda backend core)
set(allow_backend_registry backend backend_cpu backend_cuda core)
set(allow_model backend io core)     # never a concrete backend nor the registry: it is handed a Backend&
set(allow_data io core)               # io: bounded reads of small files, run locks (file_util, run_lock)
set(allow_io core)
set(allow_dist backend core)         # communicators, sharding: tensors and the backend interface
set(allow_train backend backend_registry model data io dist core)
set(allow_eval backend backend_registry model data io dist core)  # beside train, with its rules
set(allow_serve backend backend_registry model data io train core)
set(allow_cli ${layers})
# CUDA headers (<cuda*.h>, cuBLAS, NCCL, cuDNN, CUB, Thrust, cooperative groups, WMMA, libcu++,
# cuRAND, cuFFT, NVTX) and where they may appear.
set(cuda_header_regex "^(cuda[^/]*\\.h|cublas[^/]*\\.h|nccl[^/]*\\.h|cudnn[^/]*\\.h|curand[^/]*\\.h|cufft[^/]*\\.h|mma\\.h|cub/.*|thrust/.*|cooperative_groups.*|cuda/.*|nvtx3/.*|nvToolsExt.*)$")
set(cuda_allowed_regex "^(backend/cuda/.*|dist/nccl_[^/]*)$")

function(layer_of rel out)
  if(rel MATCHES "^backend/backend_registry\\.[^/]+$")
    set(layer backend_registry)
  elseif(rel MATCHES "^backend/cpu/")
    set(layer backend_cpu)
  elseif(rel MATCHES "^backend/cuda/")
    set(layer backend_cuda)
  elseif(rel MATCHES "^([^/]+)/")
    set(layer "${CMAKE_MATCH_1}")
    if(NOT layer IN_LIST layers)
      set(layer "")
    endif()
  else()
    set(layer "")
  endif()
  set(${out} "${layer}" PARENT_SCOPE)
endfunction()

file(GLOB_RECURSE sources RELATIVE "${SRC_DIR}" "${SRC_DIR}/*.h" "${SRC_DIR}/*.hpp" "${SRC_DIR}/*.cpp"
     "${SRC_DIR}/*.cc" "${SRC_DIR}/*.cu" "${SRC_DIR}/*.cuh" "${SRC_DIR}/*.inl")
list(SORT sources)
set(violations 0)
set(n_includes 0)
foreach(rel IN LISTS sources)
  layer_of("${rel}" from)
  if(from STREQUAL "")
    message("layering: ${SRC_DIR}/${rel}: in no known layer (add its folder to cmake/layering_check.cmake)")
    math(EXPR violations "${violations} + 1")
    continue()
  endif()
  get_filename_component(dir "${rel}" DIRECTORY)
  # One list element per line: characters that CMake lists treat specially (; \ [ ]) are dropped
  # first (no include path contains them), so that element i is line i + 1.
  file(READ "${SRC_DIR}/${rel}" text)
  foreach(special ";" "[" "]" "\\")
    string(REPLACE "${special}" "" text "${text}")
  endforeach()
  string(REPLACE "\n" ";" lines "${text}")
  set(line_no 0)
  foreach(line IN LISTS lines)
    math(EXPR line_no "${line_no} + 1")
    if(NOT line MATCHES "^[ \t]*#[ \t]*include[ \t]*([<\"])([^>\"]+)[>\"]")
      continue()
    endif()
    set(quote "${CMAKE_MATCH_1}")
    set(inc "${CMAKE_MATCH_2}")
    if(quote STREQUAL "<")
      set(spelled "<${inc}>")
    else()
      set(spelled "\"${inc}\"")
    endif()
    math(EXPR n_includes "${n_includes} + 1")
    set(where "${SRC_DIR}/${rel}:${line_no}")
    # The project header it names, if any: beside the including file ("" quotes only), then under src/.
    set(target "")
    foreach(base "${SRC_DIR}/${dir}" "${SRC_DIR}")
      if(base STREQUAL "${SRC_DIR}/${dir}" AND NOT quote STREQUAL "\"")
        continue()
      endif()
      get_filename_component(abs "${base}/${inc}" ABSOLUTE)
      if(EXISTS "${abs}" AND NOT IS_DIRECTORY "${abs}")
        file(RELATIVE_PATH target "${SRC_DIR}" "${abs}")
        if(target MATCHES "^\\.\\./")
          set(target "")  # outside src/
        endif()
        break()
      endif()
    endforeach()
    if(target STREQUAL "")
      if(inc MATCHES "${cuda_header_regex}")
        if(NOT rel MATCHES "${cuda_allowed_regex}")
          message("layering: ${where}: includes the CUDA header <${inc}>; CUDA headers belong in "
                  "src/backend/cuda/ and src/dist/nccl_* only (the ${from} layer builds without the toolkit)")
          math(EXPR violations "${violations} + 1")
        endif()
      elseif(quote STREQUAL "\"")
        message("layering: ${where}: includes ${spelled}, which is no file under ${SRC_DIR}")
        math(EXPR violations "${violations} + 1")
      endif()
      continue()
    endif()
    layer_of("${target}" to)
    if(to STREQUAL from OR to IN_LIST allow_${from})
      continue()
    endif()
    if(to STREQUAL "")
      set(to "no layer")
    endif()
    string(REPLACE ";" " " allowed "${allow_${from}}")
    if(allowed STREQUAL "")
      set(allowed "nothing but itself")
    endif()
    message("layering: ${where}: ${from} includes ${spelled} (${to}); ${from} may include: ${allowed}")
    math(EXPR violations "${violations} + 1")
  endforeach()
endforeach()

list(LENGTH sources n_files)
if(violations GREATER 0)
  message(FATAL_ERROR "layering: ${violations} violation(s) in ${n_files} files under ${SRC_DIR}")
endif()
message("layering: OK, ${n_includes} includes in ${n_files} files under ${SRC_DIR}")
