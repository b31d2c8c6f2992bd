echo "built in the build stage, in $(pwd)"
