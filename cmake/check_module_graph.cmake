# Checks every #include "<module>/..." in each module folder against
# cmake/modules.cmake. Run at configure time and, as the target
# zg_module_graph, before every build:
#   cmake -DZG_ROOT=<source dir> -P cmake/check_module_graph.cmake
# Fails with one line per wrong-way include: file, line, what it may use.
cmake_minimum_required(VERSION 3.18)
if(NOT ZG_ROOT)
  set(ZG_ROOT ${CMAKE_CURRENT_LIST_DIR}/..)
endif()
include(${ZG_ROOT}/cmake/modules.cmake)
set(all_folders ${ZG_MODULES} node)
set(violations "")
foreach(mod ${all_folders})
  file(GLOB files ${ZG_ROOT}/${mod}/*.c ${ZG_ROOT}/${mod}/*.h)
  foreach(f ${files})
    file(STRINGS ${f} lines REGEX "^[ \t]*#[ \t]*include[ \t]*\"[a-z_]+/[^\"]+\"")
    foreach(line ${lines})
      string(REGEX REPLACE ".*\"([a-z_]+)/([^\"]+)\".*" "\\1;\\2" parts "${line}")
      list(GET parts 0 target)
      list(GET parts 1 header)
      if(target STREQUAL mod OR NOT target IN_LIST all_folders)
        continue()
      endif()
      file(RELATIVE_PATH rel ${ZG_ROOT} ${f})
      if(NOT target IN_LIST ZG_DEPS_${mod})
        string(REPLACE ";" " " allowed "${ZG_DEPS_${mod}}")
        list(APPEND violations
             "${rel}: includes ${target}/${header}, but ${mod}/ may only use: ${allowed}")
      elseif(NOT header STREQUAL "${target}.h")
        list(APPEND violations
             "${rel}: includes ${target}/${header}, a private header of ${target}/ (use ${target}/${target}.h)")
      endif()
    endforeach()
  endforeach()
endforeach()
if(violations)
  string(REPLACE ";" "\n  " text "${violations}")
  message(FATAL_ERROR "module graph violated (see cmake/modules.cmake):\n  ${text}")
endif()
