//! Image references, parsed and normalised like Docker
//! (`nginx` → `docker.io/library/nginx:latest`). (Store helper: implement.)
