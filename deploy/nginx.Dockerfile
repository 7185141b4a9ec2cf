# nginx from Debian, for hosts that cannot pull the official nginx image (the CI smoke test):
#   docker build -f deploy/nginx.Dockerfile --build-arg BASE_IMAGE=chatglm-serve-base:bookworm \
#       -t chatglm-serve-nginx:1.22 deploy
# then NGINX_IMAGE=chatglm-serve-nginx:1.22 for docker-compose.yml's replicas profile.
ARG BASE_IMAGE=debian:bookworm-20250520-slim
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx=1.22.* \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/default \
    && ln -sf /dev/stdout /var/log/nginx/access.log \
    && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 8080
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
