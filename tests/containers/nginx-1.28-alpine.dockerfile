# Stands in for the official nginx:1.28-alpine where registry images cannot be pulled: Debian's
# nginx on the slim Debian stand-in, laid out as the official image is, so that
# docker-compose.yml works unchanged on either:
# - the same entrypoint behaviour: templates in /etc/nginx/templates/*.template are filled from
#   the container's environment (only the variables it defines) into /etc/nginx/conf.d/;
# - the same nginx.conf (conf.d/*.conf included; pid /run/nginx.pid; temporary files under
#   /var/cache/nginx, where the official build has them), logs to the container's output;
# - the same user (nginx, uid and gid 101), port, stop signal and command.
#   built by tests/docker_stack.py, from a context holding this file and nginx/
# The parent is the stand-in made by debian-bookworm-slim.sh, given as a build argument.
# hadolint ignore=DL3006
ARG BASE
# hadolint ignore=DL3006
FROM ${BASE}
LABEL org.opencontainers.image.description="stand-in for nginx:1.28-alpine (tests/containers)"
# Debian's packages at the suite's current versions, as the official image takes its own.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx gettext-base \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled /etc/nginx/sites-available /var/log/nginx/* \
    && groupadd --system --gid 101 nginx \
    && useradd --system --no-log-init --uid 101 --gid 101 --home-dir /nonexistent --shell /bin/false nginx \
    && mkdir -p /var/cache/nginx /etc/nginx/conf.d /etc/nginx/templates /docker-entrypoint.d \
    && ln -s /dev/stdout /var/log/nginx/access.log \
    && ln -s /dev/stderr /var/log/nginx/error.log
COPY nginx/nginx.conf /etc/nginx/nginx.conf
COPY nginx/default.conf /etc/nginx/conf.d/default.conf
COPY nginx/docker-entrypoint.sh /
COPY nginx/20-envsubst-on-templates.sh /docker-entrypoint.d/
ENTRYPOINT ["/docker-entrypoint.sh"]
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
