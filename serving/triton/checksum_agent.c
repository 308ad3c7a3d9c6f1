/*
 * A checksum repository agent for real tritonserver: the stand-in for NVIDIA's
 * libtritonrepoagent_checksum.so, which the nvidia-pytriton wheel does not ship (without it
 * Triton refuses a model whose config.pbtxt has a model_repository_agents block).
 *
 * Same contract as Triton's checksum agent (triton-inference-server/checksum_repository_agent):
 * on TRITONREPOAGENT_ACTION_LOAD, every agent parameter "<ALGORITHM>:<path relative to the model
 * folder>" -> "<lowercase hex digest>" is checked against the file; MD5 is the one algorithm (case
 * does not matter); a mismatch, a missing file or another algorithm fails the load with a message
 * naming the file. Written from the API's documented types, not copied from NVIDIA's source.
 *
 * Built by serving/triton/process.py with the system C compiler. No headers beyond libc: the few
 * Triton entry points are declared here (the tritonserver process exports them), and MD5 comes
 * from the system's libcrypto through dlopen, so no OpenSSL development files are needed.
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef struct TRITONSERVER_Error TRITONSERVER_Error;
typedef struct TRITONREPOAGENT_Agent TRITONREPOAGENT_Agent;
typedef struct TRITONREPOAGENT_AgentModel TRITONREPOAGENT_AgentModel;

/* Values of Triton's enums (tritonserver.h, tritonrepoagent.h). */
enum { ACTION_LOAD = 0 };
enum { ARTIFACT_FILESYSTEM = 0 };
enum { ERROR_NOT_FOUND = 2, ERROR_INVALID_ARG = 3, ERROR_UNSUPPORTED = 5 };

extern TRITONSERVER_Error* TRITONSERVER_ErrorNew(int code, const char* message);
extern TRITONSERVER_Error* TRITONREPOAGENT_ModelRepositoryLocation(
    TRITONREPOAGENT_Agent* agent, TRITONREPOAGENT_AgentModel* model, int* artifact_type, const char** location);
extern TRITONSERVER_Error* TRITONREPOAGENT_ModelParameterCount(
    TRITONREPOAGENT_Agent* agent, TRITONREPOAGENT_AgentModel* model, uint32_t* count);
extern TRITONSERVER_Error* TRITONREPOAGENT_ModelParameter(
    TRITONREPOAGENT_Agent* agent, TRITONREPOAGENT_AgentModel* model, uint32_t index, const char** key,
    const char** value);

typedef unsigned char* (*md5_fn)(const unsigned char* data, size_t size, unsigned char* digest);

static TRITONSERVER_Error* failure(int code, const char* what, const char* file, const char* detail) {
  char message[4096];
  snprintf(message, sizeof message, "checksum agent: %s %s%s%s", what, file, detail ? ": " : "", detail ? detail : "");
  return TRITONSERVER_ErrorNew(code, message);
}

static md5_fn find_md5(void) {
  /* libcrypto 3 still exports the one-shot MD5(); 1.1 as well. */
  static const char* names[] = {"libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so"};
  for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
    void* library = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (library != NULL) {
      md5_fn md5 = (md5_fn)dlsym(library, "MD5");
      if (md5 != NULL) return md5;
    }
  }
  return NULL;
}

/* The file's MD5 as 32 lowercase hex digits into hex[33]; NULL on success, else the error. */
static TRITONSERVER_Error* md5_hex(const char* path, const char* relative, char hex[33]) {
  static md5_fn md5 = NULL;
  if (md5 == NULL && (md5 = find_md5()) == NULL) {
    return failure(ERROR_UNSUPPORTED, "no libcrypto with MD5 to check", relative, NULL);
  }
  FILE* file = fopen(path, "rb");
  if (file == NULL) return failure(ERROR_NOT_FOUND, "cannot open", relative, NULL);
  unsigned char* data = NULL;
  long size = -1;
  if (fseek(file, 0, SEEK_END) == 0) size = ftell(file);
  if (size >= 0 && fseek(file, 0, SEEK_SET) == 0) data = malloc(size > 0 ? (size_t)size : 1);
  size_t read = data != NULL ? fread(data, 1, (size_t)size, file) : 0;
  fclose(file);
  if (data == NULL || read != (size_t)size) {
    free(data);
    return failure(ERROR_INVALID_ARG, "cannot read", relative, NULL);
  }
  unsigned char digest[16];
  md5(data, (size_t)size, digest);
  free(data);
  for (int i = 0; i < 16; i++) snprintf(hex + 2 * i, 3, "%02x", digest[i]);
  return NULL;
}

TRITONSERVER_Error* TRITONREPOAGENT_ModelAction(
    TRITONREPOAGENT_Agent* agent, TRITONREPOAGENT_AgentModel* model, const int action) {
  if (action != ACTION_LOAD) return NULL; /* only a load is checked */
  int artifact_type = -1;
  const char* location = NULL;
  TRITONSERVER_Error* error = TRITONREPOAGENT_ModelRepositoryLocation(agent, model, &artifact_type, &location);
  if (error != NULL) return error;
  if (artifact_type != ARTIFACT_FILESYSTEM) {
    return failure(ERROR_UNSUPPORTED, "models on a remote file system are not supported:", location, NULL);
  }
  uint32_t count = 0;
  if ((error = TRITONREPOAGENT_ModelParameterCount(agent, model, &count)) != NULL) return error;
  for (uint32_t index = 0; index < count; index++) {
    const char *key = NULL, *expected = NULL;
    if ((error = TRITONREPOAGENT_ModelParameter(agent, model, index, &key, &expected)) != NULL) return error;
    const char* colon = strchr(key, ':');
    if (colon == NULL) return failure(ERROR_INVALID_ARG, "a key must be ALGORITHM:path, not", key, NULL);
    const char* relative = colon + 1;
    if ((size_t)(colon - key) != 3 || strncasecmp(key, "MD5", 3) != 0) {
      return failure(ERROR_UNSUPPORTED, "only MD5 is supported, not the algorithm of", key, NULL);
    }
    if (relative[0] == '/' || strstr(relative, "..") != NULL) {
      return failure(ERROR_INVALID_ARG, "a path must stay inside the model folder:", relative, NULL);
    }
    char path[4096], actual[33];
    snprintf(path, sizeof path, "%s/%s", location, relative);
    if ((error = md5_hex(path, relative, actual)) != NULL) return error;
    if (strcasecmp(actual, expected) != 0) {
      char detail[128];
      snprintf(detail, sizeof detail, "expected %.40s, got %s", expected, actual);
      return failure(ERROR_INVALID_ARG, "mismatched MD5 for", relative, detail);
    }
  }
  return NULL;
}
