# Sourced by shell tests. make_csv ROWS DATA_FILE LABEL_FILE writes a tiny
# 4-class data set of 784 features per row: the class is which of every
# fourth feature is hot, so any network learns it to accuracy 1.
make_csv() {
  local n=$1 file=$2 labels=$3
  : > "$file"; : > "$labels"
  for ((i = 0; i < n; i++)); do
    local c=$((i % 4)) row="" v
    for ((j = 0; j < 784; j++)); do
      if (( j % 4 == c )); then v=1; else v=0; fi
      row+="${row:+,}$v"
    done
    echo "$row" >> "$file"; echo "$c" >> "$labels"
  done
}
